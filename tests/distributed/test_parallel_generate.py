"""LLM(tensor_parallel_size=2 / pipeline_parallel_size=2 / both) greedy generations
token-identical to one process, on spawned CPU ranks over gloo.

Each case combines what it exercises, to keep the number of spawned groups small:
Llama GQA (2 KV heads over 2 ranks) with an odd vocabulary (padded to a multiple of tp)
and biases on every projection (the row-parallel ones added once, after the reduce)
under a KV cache small enough to preempt; Qwen2 (qkv bias, tied embeddings) with one KV
head (replicated over the TP ranks); an uneven pipeline split (3 layers on 2 stages)
preempting into swap space; a tied LM head on a last stage that has no embedding.
"""
from __future__ import annotations

import random

import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams

MAX_NEW = 6
TINY_CACHE = dict(num_kv_blocks=8, block_size=8)             # preempts these prompts
TINY_CACHE_SWAP = dict(TINY_CACHE, swap_space=0.001)         # ... into swap space

CASES = [  # (tp, pp, arch, checkpoint overrides, LLM settings)
    (2, 1, "llama", {"vocab_size": 383, "attention_bias": True, "mlp_bias": True}, TINY_CACHE),
    (2, 1, "qwen2", {"num_key_value_heads": 1}, {}),
    (1, 2, "llama", {"num_hidden_layers": 3}, TINY_CACHE_SWAP),
    (1, 2, "qwen2", {}, {}),
    (2, 2, "qwen2", {"num_key_value_heads": 1, "vocab_size": 383}, TINY_CACHE),
]
IDS = [f"tp{tp}_pp{pp}_{arch}_" + "_".join(f"{k}{v}" for k, v in o.items()) + ("_preempt" if s else "")
       for tp, pp, arch, o, s in CASES]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 17, 30, 9, 41)]


def _greedy(llm, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("tp, pp, arch, overrides, settings", CASES, ids=IDS)
def test_parallel_greedy_matches_single_process(tp, pp, arch, overrides, settings):
    path = str(cached_checkpoint(arch, **overrides))
    prompts = _prompts(overrides.get("vocab_size", 384))
    kw = dict(device="cpu", dtype="float32", max_model_len=128, seed=0, **settings)
    single = LLM(path, **kw)
    try:
        expected = _greedy(single, prompts)
        single_preemptions = single.llm_engine.scheduler.num_preemptions
    finally:
        single.close()
    llm = LLM(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    try:
        got = _greedy(llm, prompts)
        preemptions = llm.llm_engine.scheduler.num_preemptions
        driver_model = llm.llm_engine.runner.model        # rank 0: its heads, its stage's layers
        layers = overrides.get("num_hidden_layers", 2)
        assert driver_model.layers[0].self_attn.num_heads == 4 // tp
        assert len(driver_model.layers) == (layers + pp - 1) // pp
        assert (driver_model.lm_head is None) == (pp > 1)
        kv_caches = llm.llm_engine.runner.kv.kv_caches     # this rank's KV heads and layers only
        kv_heads = overrides.get("num_key_value_heads", 2)
        assert len(kv_caches) == len(driver_model.layers)
        assert kv_caches[0][0].shape[2] == max(1, kv_heads // tp)
    finally:
        llm.close()
    assert got == expected
    assert all(len(tokens) == MAX_NEW for tokens in got)
    if settings:                   # the tiny cache preempted, identically on every rank
        assert single_preemptions > 0 and preemptions > 0
