"""LLMEngine on tiny random-weight checkpoints: greedy outputs token-identical to HF
transformers' generate, whatever the batch mix, cache size (preemption, swap), chunk
size, prefix caching and max_num_seqs."""
import random

import pytest
import torch

from checkpoints import EOS_ID, cached_checkpoint, hf_greedy, load_hf_model
from fastllm.config import EngineConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams

MAX_NEW = 16
VOCAB = 384


@pytest.fixture(scope="module")
def llama_case():
    """(checkpoint path, prompts, HF references): 56 requests, a third sharing a 40-token
    system prompt. References computed once for all settings."""
    path = cached_checkpoint("llama")
    hf = load_hf_model(path)
    rng = random.Random(0)
    system = [rng.randrange(3, VOCAB) for _ in range(40)]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(38)]
    prompts += [system + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(18)]
    rng.shuffle(prompts)
    return path, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def make_engine(path, **kw):
    kw.setdefault("max_model_len", 128)
    return LLMEngine.from_pretrained(str(path), EngineConfig(**kw), dtype="float32", device="cpu")


def run(engine, prompts, arrive_over_time=False, seed=0):
    rng = random.Random(seed)
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    pending = list(enumerate(prompts))
    first = len(pending) if not arrive_over_time else len(pending) // 3
    for i, p in pending[:first]:
        engine.add_request(str(i), p, sp)
    pending = pending[first:]
    finished = {}
    while engine.has_unfinished_requests() or pending:
        while pending and rng.random() < 0.4:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, sp)
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out
    return [finished[i] for i in range(len(prompts))]


def assert_clean(engine):
    alloc = engine.block_manager.allocator
    assert alloc.num_in_use == 0 and alloc.num_free == engine.block_manager.num_blocks
    assert all(alloc.ref_count(b) == 0 for b in range(engine.block_manager.num_blocks))
    sch = engine.scheduler
    assert not (sch.running or sch.waiting or sch.swapped or sch.groups)


SETTINGS = {
    "default": dict(),
    "tiny_cache_recompute": dict(num_kv_blocks=12, block_size=8),
    "tiny_cache_swap": dict(num_kv_blocks=12, block_size=8, swap_space=0.01),
    "chunk8": dict(max_num_batched_tokens=8),
    "no_prefix_cache": dict(enable_prefix_caching=False, num_kv_blocks=40, block_size=4),
    "seqs1": dict(max_num_seqs=1),
    "seqs5_chunk16_tiny": dict(max_num_seqs=5, max_num_batched_tokens=16, num_kv_blocks=16, block_size=8),
    "seqs64": dict(max_num_seqs=64, block_size=16),
}


# Every setting with all requests at once; the cache/chunk settings also with arrivals over time.
CASES = [(name, False) for name in SETTINGS] + [
    (name, True) for name in ("default", "tiny_cache_recompute", "tiny_cache_swap", "chunk8",
                              "seqs5_chunk16_tiny")]


@pytest.mark.parametrize("name,arrive_over_time", CASES,
                         ids=[f"{n}-{'over_time' if t else 'at_once'}" for n, t in CASES])
def test_greedy_matches_transformers(llama_case, name, arrive_over_time):
    path, prompts, refs = llama_case
    engine = make_engine(path, **SETTINGS[name])
    outs = run(engine, prompts, arrive_over_time)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        got = out.outputs[0].token_ids
        assert got == ref, f"request {i} ({len(prompts[i])} prompt tokens) under {name}"
        assert out.outputs[0].finish_reason == ("stop" if ref[-1] == EOS_ID else "length")
    stats = engine.get_stats()
    if "tiny" in name:
        assert stats.num_preemptions > 0
    if name == "tiny_cache_swap":
        assert stats.num_swaps_out > 0
    if name == "default" and arrive_over_time:
        # Later arrivals reuse the shared system prompt's blocks (requests admitted in the
        # same step cannot: blocks are cached once computed).
        assert stats.prefix_cache_hit_rate > 0
    assert_clean(engine)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures(arch):
    path = cached_checkpoint(arch)
    hf = load_hf_model(path)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    engine = make_engine(path, num_kv_blocks=16, block_size=8, max_num_batched_tokens=24)
    outs = run(engine, prompts)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, MAX_NEW)
    assert_clean(engine)


def test_shared_prefix_computes_only_suffix(llama_case):
    path = llama_case[0]
    hf = load_hf_model(path)
    engine = make_engine(path, max_model_len=256, block_size=16)
    rng = random.Random(2)
    prefix = [rng.randrange(3, VOCAB) for _ in range(200)]
    a, b = prefix + [5, 6, 7], prefix + [8, 9]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", a, sp)
    while engine.has_unfinished_requests():
        engine.step()
    before = engine.scheduler.num_prefill_tokens_computed
    engine.add_request("b", b, sp)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    # 12 full blocks (192 tokens) are reused; b computes its other 10 tokens.
    assert out.metrics.num_cached_tokens == 192
    assert engine.scheduler.num_prefill_tokens_computed - before == len(b) - 192
    ref = hf.generate(torch.tensor([b]), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                      pad_token_id=0)[0, len(b):].tolist()
    got = out.outputs[0].token_ids
    if EOS_ID not in ref:          # min_new_tokens only differs from ignore_eos at an eos
        assert got == ref
    assert_clean(engine)


def test_abort_mid_prefill_and_mid_decode(llama_case):
    path, prompts, refs = llama_case
    engine = make_engine(path, max_num_batched_tokens=8)
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    engine.add_request("keep", prompts[0], sp)
    engine.add_request("prefill", list(range(3, 60)), sp)
    engine.add_request("decode", [5, 6], SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    groups = engine.scheduler.groups
    pre, dec = groups["prefill"].seqs[0], groups["decode"].seqs[0]
    aborted = set()
    finished = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
        if "prefill" not in aborted and 0 < pre.num_computed_tokens < pre.prompt_len:
            engine.abort_request("prefill")
            aborted.add("prefill")
        if "decode" not in aborted and dec.num_output_tokens >= 2:
            engine.abort_request("decode")
            aborted.add("decode")
    assert aborted == {"prefill", "decode"}
    assert set(finished) == {"keep"}
    assert finished["keep"].outputs[0].token_ids == refs[0]
    assert_clean(engine)


def test_rejects_impossible_requests_while_others_finish(llama_case):
    path, prompts, refs = llama_case
    engine = make_engine(path, num_kv_blocks=12, block_size=8)     # 96 tokens of cache
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    engine.add_request("a", prompts[0], sp)
    engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("too_long", [5] * 120, SamplingParams(max_tokens=16))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("too_big", [5] * 90, SamplingParams(max_tokens=16))
    engine.add_request("b", prompts[1], sp)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done["a"].outputs[0].token_ids == refs[0]
    assert done["b"].outputs[0].token_ids == refs[1]
    assert_clean(engine)


def test_streaming_deltas_and_stop_strings(llama_case):
    path = llama_case[0]
    engine = make_engine(path)
    tok = engine.tokenizer
    prompt = tok.encode("The capital of France is")
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("full", prompt, sp)
    engine.add_request("delta", prompt, sp, delta=True)
    full, pieces, piece_ids = None, [], []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == "full":
                full = o
            else:
                pieces.append(o.outputs[0].text)
                piece_ids += o.outputs[0].token_ids
    text = full.outputs[0].text
    assert "".join(pieces) == text == tok.decode(full.outputs[0].token_ids)
    assert piece_ids == full.outputs[0].token_ids
    # A stop string cut from the middle of that text: output ends right before it.
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("degenerate random text")
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                      stop=[stop]))
    out = None
    while engine.has_unfinished_requests():
        out = engine.step()[-1]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:text.index(stop)]
    assert_clean(engine)
