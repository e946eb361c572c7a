"""fastllm's Llama-family model on the paged KV cache vs Hugging Face transformers.

A small test-local driver plays the engine: all prompts prefilled as one flattened
batch (optionally in chunks, so prefill chunks and decodes share a step) with shuffled,
non-contiguous block tables, then every sequence decoded together. Greedy tokens must
equal transformers' `generate` (fp32) and every step's logits must match.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from checkpoints import cached_checkpoint, load_hf_model
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.loader import load_model

VOCAB = 384
PROMPT_LENS = (1, 6, 17, 40)
MAX_NEW_TOKENS = 32
REL_TOL = 1e-4


def make_prompts(lens=PROMPT_LENS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lens]


def paged_greedy(model, config, prompts, max_new_tokens, block_size, prefill_chunk=None, seed=0,
                 device="cpu"):
    """Greedy generation through the paged cache. -> (tokens per prompt, [steps, vocab]
    logits per prompt). prefill_chunk caps the prompt tokens a sequence feeds per step."""
    rng = random.Random(seed)
    blocks_needed = [math.ceil((len(p) + max_new_tokens) / block_size) for p in prompts]
    num_blocks = sum(blocks_needed) + 3            # spare blocks stay unused
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in blocks_needed]
    block_tables_all = torch.zeros(len(prompts), max(blocks_needed), dtype=torch.int32)
    for i, table in enumerate(tables):
        block_tables_all[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
    dtype = next(model.parameters()).dtype
    kv_caches = allocate_kv_caches(config, num_blocks, block_size, dtype, device)

    tokens = [list(p) for p in prompts]
    num_computed = [0] * len(prompts)
    step_logits = [[] for _ in prompts]
    while any(len(t) - len(p) < max_new_tokens for t, p in zip(tokens, prompts)):
        active = [i for i in range(len(prompts)) if len(tokens[i]) - len(prompts[i]) < max_new_tokens]
        input_ids, positions, slots, seq_lens, query_lens = [], [], [], [], []
        for i in active:
            n = len(tokens[i]) - num_computed[i]
            if prefill_chunk and num_computed[i] < len(prompts[i]):
                n = min(n, prefill_chunk)
            pos = range(num_computed[i], num_computed[i] + n)
            input_ids += tokens[i][pos.start:pos.stop]
            positions += list(pos)
            slots += [tables[i][p // block_size] * block_size + p % block_size for p in pos]
            seq_lens.append(pos.stop)
            query_lens.append(n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=block_tables_all[active].to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(device),
        )
        with torch.no_grad():
            logits = model(torch.tensor(input_ids, dtype=torch.int64, device=device),
                           torch.tensor(positions, dtype=torch.int64, device=device),
                           kv_caches, meta).cpu()
        assert logits.shape == (len(active), config.vocab_size) and logits.dtype == torch.float32
        for row, i in enumerate(active):
            num_computed[i] += query_lens[row]
            if num_computed[i] == len(tokens[i]):   # a partial prefill chunk samples nothing
                step_logits[i].append(logits[row])
                tokens[i].append(int(logits[row].argmax()))
    return ([t[len(p):] for t, p in zip(tokens, prompts)],
            [torch.stack(s) for s in step_logits])


_HF_CACHE = {}


def hf_greedy(path, prompts, max_new_tokens):
    """transformers' generate, one prompt at a time (no padding), never stopping at EOS."""
    key = (str(path), tuple(map(tuple, prompts)), max_new_tokens)
    if key not in _HF_CACHE:
        hf = load_hf_model(path)
        hf.generation_config.eos_token_id = None
        results = []
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                              min_new_tokens=0, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
            results.append((out.sequences[0, len(prompt):].tolist(),
                            torch.cat(out.logits).float()))
        _HF_CACHE[key] = results
    return _HF_CACHE[key]


def assert_matches_hf(path, prompts, tokens, logits, max_new_tokens, rel_tol=REL_TOL):
    for i, (prompt, (ref_tokens, ref_logits)) in enumerate(zip(prompts, hf_greedy(path, prompts, max_new_tokens))):
        assert len(ref_tokens) == max_new_tokens
        # Non-degenerate weights: the comparison must be able to fail.
        assert len(set(ref_tokens)) >= 8, f"prompt {i}: degenerate reference {ref_tokens}"
        # Logits first: a near-tie flip would show up as a token mismatch below.
        first_diff = next((s for s, (a, b) in enumerate(zip(tokens[i], ref_tokens)) if a != b), None)
        steps = first_diff + 1 if first_diff is not None else max_new_tokens
        err = (logits[i][:steps] - ref_logits[:steps]).abs().amax(dim=-1)
        rel = err / ref_logits[:steps].abs().amax(dim=-1)
        assert rel.max() < rel_tol, f"prompt {i} (len {len(prompt)}): logits rel err {rel.max():.2e}"
        assert tokens[i] == ref_tokens, f"prompt {i} (len {len(prompt)}) diverges at step {first_diff}"
    assert len({tuple(t) for t in tokens}) == len(tokens), "different prompts gave the same output"


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_batched_greedy_matches_transformers(arch, sharded):
    path = cached_checkpoint(arch, sharded=sharded)
    model, config = load_model(path)
    prompts = make_prompts()
    block_size = 4 if sharded else 16
    tokens, logits = paged_greedy(model, config, prompts, MAX_NEW_TOKENS, block_size, seed=1)
    assert_matches_hf(path, prompts, tokens, logits, MAX_NEW_TOKENS)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_chunked_prefill_matches_transformers(arch):
    # Chunks of 12: the 17- and 40-token prompts take 2 and 4 steps, so their later
    # chunks run in the same step as the short prompts' decodes.
    path = cached_checkpoint(arch)
    model, config = load_model(path)
    prompts = make_prompts()
    tokens, logits = paged_greedy(model, config, prompts, MAX_NEW_TOKENS, block_size=4,
                                  prefill_chunk=12, seed=2)
    assert_matches_hf(path, prompts, tokens, logits, MAX_NEW_TOKENS)


def test_single_prompt_in_two_chunks():
    path = cached_checkpoint("llama")
    model, config = load_model(path)
    prompts = make_prompts((23,), seed=5)
    tokens, logits = paged_greedy(model, config, prompts, MAX_NEW_TOKENS, block_size=16,
                                  prefill_chunk=12, seed=3)
    assert_matches_hf(path, prompts, tokens, logits, MAX_NEW_TOKENS)


@pytest.mark.parametrize("overrides", [
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
], ids=["linear-rope", "llama-biases-tied"])
def test_config_variants_match_transformers(tmp_path, overrides):
    from checkpoints import write_checkpoint
    path = write_checkpoint(tmp_path, "llama", seed=7, **overrides)
    model, config = load_model(path)
    prompts = make_prompts((3, 29), seed=7)
    tokens, logits = paged_greedy(model, config, prompts, 16, block_size=4, prefill_chunk=10)
    assert_matches_hf(path, prompts, tokens, logits, 16)


def test_logits_only_for_last_token_of_each_sequence():
    """Rows of the result are each sequence's last query token; equal to a one-sequence
    run of the same tokens (batch composition does not change a sequence's logits)."""
    path = cached_checkpoint("mistral")
    model, config = load_model(path)
    prompts = make_prompts((5, 9), seed=11)
    together, _ = paged_greedy(model, config, prompts, 4, block_size=4)
    alone = [paged_greedy(model, config, [p], 4, block_size=4)[0][0] for p in prompts]
    assert together == alone
    kv = allocate_kv_caches(config, 4, 4)
    meta = AttentionMetadata(torch.arange(5), torch.tensor([[0, 1]], dtype=torch.int32),
                             torch.tensor([5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_caches"):
        model(torch.tensor(prompts[0]), torch.arange(5), kv[:1], meta)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_float32_matches_transformers(arch):
    """On the GPU (native kernels when built, else the torch references on CUDA tensors),
    fp32 greedy output equals transformers' CPU output."""
    path = cached_checkpoint(arch)
    model, config = load_model(path, dtype=torch.float32, device="cuda")
    prompts = make_prompts()
    tokens, logits = paged_greedy(model, config, prompts, MAX_NEW_TOKENS, block_size=16,
                                  prefill_chunk=12, device="cuda")
    assert_matches_hf(path, prompts, tokens, logits, MAX_NEW_TOKENS, rel_tol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_first_token_logits(dtype):
    path = cached_checkpoint("mistral")
    model, config = load_model(path, dtype=dtype, device="cuda")
    prompts = make_prompts()
    _, logits = paged_greedy(model, config, prompts, 1, block_size=16, device="cuda")
    for prompt, got, (_, ref) in zip(prompts, logits, hf_greedy(path, prompts, MAX_NEW_TOKENS)):
        rel = (got[0] - ref[0]).abs().max() / ref[0].abs().max()
        assert rel < 5e-2, f"prompt of {len(prompt)}: rel err {rel:.2e} in {dtype}"
