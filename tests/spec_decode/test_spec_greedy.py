"""Speculative decoding, greedy: outputs token-identical to HF transformers' greedy
generate on the same random-weight GQA checkpoints, with n-gram and draft-model
proposals, under preemption (recompute and swap), prefix caching, chunked prefill and
n > 1; every block comes back; speculation really ran (drafts verified, some rejected)."""
import random

import pytest

from checkpoints import EOS_ID, cached_checkpoint, hf_greedy, load_hf_model
from fastllm.config import EngineConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams

MAX_NEW = 16
VOCAB = 384


def make_engine(path, **kw):
    kw.setdefault("max_model_len", 128)
    return LLMEngine.from_pretrained(str(path), EngineConfig(**kw), dtype="float32", device="cpu")


def case_prompts(seed):
    """Random prompts, some repeating a segment (n-gram lookup finds those), a few
    sharing a 24-token system prompt (prefix cache hits)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, VOCAB) for _ in range(24)]
    prompts = []
    for i in range(12):
        body = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        if i % 3 == 0:
            body = body * 3
        prompts.append(system + body if i % 4 == 0 else body)
    return prompts


@pytest.fixture(scope="module")
def llama_case():
    path = cached_checkpoint("llama")
    hf = load_hf_model(path)
    prompts = case_prompts(0)
    return path, prompts, [hf_greedy(hf, p, MAX_NEW) for p in prompts]


def run(engine, prompts, n=1, arrive_over_time=False):
    """Greedy outputs of every prompt; with arrive_over_time, most requests join while
    others run (and so hit the prefix cache of the ones before)."""
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, n=n)
    rng = random.Random(1)
    pending = list(enumerate(prompts))
    outs = {}
    first = len(pending) if not arrive_over_time else 4
    for i, p in pending[:first]:
        engine.add_request(str(i), p, sp)
    pending = pending[first:]
    while engine.has_unfinished_requests() or pending:
        while pending and rng.random() < 0.5:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, sp)
        for out in engine.step():
            if out.finished:
                outs[int(out.request_id)] = out
    return [outs[i] for i in range(len(prompts))]


def assert_clean(engine):
    bm = engine.block_manager
    assert bm.allocator.num_in_use == 0 and bm.allocator.num_free == bm.num_blocks
    assert all(bm.allocator.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert bm.num_swap_blocks_used == 0
    sch = engine.scheduler
    assert not (sch.running or sch.waiting or sch.swapped or sch.groups)


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}

SETTINGS = {
    "ngram_k5": dict(speculative_config={**NGRAM, "num_speculative_tokens": 5}),
    "ngram_tiny_cache_recompute": dict(speculative_config=NGRAM, num_kv_blocks=12, block_size=8),
    "ngram_tiny_cache_swap_chunk8": dict(speculative_config=NGRAM, num_kv_blocks=12, block_size=8,
                                         swap_space=0.01, max_num_batched_tokens=8),
    "draft_same": dict(speculative_config={"method": "draft_model", "num_speculative_tokens": 4}),
    "draft_noisy_tiny_swap": dict(speculative_config={"method": "draft_model", "num_speculative_tokens": 3},
                                  num_kv_blocks=12, block_size=8, swap_space=0.01),
}


def resolve(name, target_path, noisy_draft):
    """Settings with the draft checkpoint filled in: the target itself, or a perturbed
    copy (its drafts are often, not always, rejected)."""
    kw = dict(SETTINGS[name])
    spec = dict(kw["speculative_config"])
    if spec["method"] == "draft_model":
        spec["model"] = str(target_path) if "same" in name else noisy_draft("llama")
    kw["speculative_config"] = spec
    return kw


@pytest.mark.parametrize("name", list(SETTINGS))
def test_greedy_matches_transformers(llama_case, noisy_draft, name):
    path, prompts, refs = llama_case
    engine = make_engine(path, **resolve(name, path, noisy_draft))
    outs = run(engine, prompts, arrive_over_time=True)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.outputs[0].token_ids == ref, f"request {i} under {name}"
        assert out.outputs[0].finish_reason == ("stop" if ref[-1] == EOS_ID else "length")
    stats = engine.get_stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_accepted_tokens == sum(
        o.metrics.num_spec_accepted_tokens for o in outs)
    if name == "draft_same":
        # The target as its own draft proposes the target's own greedy tokens: all are
        # accepted but where the two passes' float rounding differs on a near tie.
        assert stats.spec_acceptance_rate > 0.9 and stats.spec_mean_accepted_length > 3
    else:                         # rejections happened, so their KV was rolled back
        assert stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    if "tiny" in name:
        assert stats.num_preemptions > 0
    if "swap" in name:
        assert stats.num_swaps_out > 0
    assert stats.prefix_cache_hit_rate > 0
    assert_clean(engine)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_n_samples_greedy(llama_case, method):
    """n = 3 greedy samples: each is the greedy output (they fork and speculate apart)."""
    path, prompts, refs = llama_case
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "model": str(path),
                                            "num_speculative_tokens": 3}
    engine = make_engine(path, speculative_config=spec, num_kv_blocks=40, block_size=8)
    outs = run(engine, prompts[:4], n=3)
    for out, ref in zip(outs, refs[:4]):
        assert [c.token_ids for c in out.outputs] == [ref] * 3
    assert engine.get_stats().spec_num_draft_tokens > 0
    assert_clean(engine)


def test_mistral_gqa_4to1_draft(noisy_draft):
    path = cached_checkpoint("mistral")
    hf = load_hf_model(path)
    prompts = case_prompts(3)[:6]
    engine = make_engine(path, num_kv_blocks=20, block_size=8, speculative_config={
        "method": "draft_model", "model": noisy_draft("mistral"), "num_speculative_tokens": 3})
    outs = run(engine, prompts)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, MAX_NEW)
    stats = engine.get_stats()
    assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens
    assert_clean(engine)
