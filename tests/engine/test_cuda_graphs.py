"""Decode CUDA graphs (fastllm.engine.cuda_graphs).

On CPU the capture/replay mechanism is the EagerCapturer (replay = call the forward again
on the static buffers), so bucketing, padding and the engine wiring are tested here:
greedy outputs equal transformers' and the plain eager engine's, padded rows never write
the KV cache, a failed capture falls back to eager, enforce_eager builds nothing. The
`cuda` tests run the real torch.cuda.CUDAGraph path on a GPU."""
import logging
import random

import pytest
import torch

from checkpoints import EOS_ID, cached_checkpoint, hf_greedy, load_hf_model
from fastllm import ops
from fastllm.config import EngineConfig
from fastllm.engine import cuda_graphs
from fastllm.engine.cuda_graphs import (DecodeGraphRunner, EagerCapturer, capture_batch_sizes,
                                        make_capturer)
from fastllm.engine.llm_engine import LLMEngine
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.loader import load_model
from fastllm.sampling_params import SamplingParams

VOCAB = 384
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def make_workload(seed=0, num=14):
    """(prompt, max_tokens) pairs: different prompt lengths, a few sharing a 24-token
    prefix (prefix caching), and different max_tokens so the running batch shrinks one
    request at a time through every bucket."""
    rng = random.Random(seed)
    system = [rng.randrange(3, VOCAB) for _ in range(24)]
    work = []
    for i in range(num):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
        if i % 4 == 0:
            prompt = system + prompt[:8]
        work.append((prompt, 2 + i))
    return work


@pytest.fixture(scope="module")
def llama_case():
    path = cached_checkpoint("llama")
    hf = load_hf_model(path)
    work = make_workload()
    return path, work, [hf_greedy(hf, p, n) for p, n in work]


@pytest.fixture
def eager_recorder(monkeypatch):
    """Engines built in the test capture with EagerCapturer (CPU stands in for the GPU)."""
    capturers = []

    def factory(device):
        capturers.append(EagerCapturer())
        return capturers[-1]
    monkeypatch.setattr(cuda_graphs, "make_capturer", factory)
    return capturers


def make_engine(path, device="cpu", **kw):
    kw.setdefault("max_model_len", 128)
    return LLMEngine.from_pretrained(str(path), EngineConfig(**kw), dtype="float32", device=device)


def run(engine, work, arrive_over_time=False, seed=0):
    """Token ids per request, and how many steps fed exactly one token per sequence."""
    rng = random.Random(seed)
    pending = [(str(i), p, SamplingParams(temperature=0, max_tokens=n)) for i, (p, n) in enumerate(work)]
    first = len(pending) // 3 if arrive_over_time else len(pending)
    for args in pending[:first]:
        engine.add_request(*args)
    pending = pending[first:]
    finished = {}
    while engine.has_unfinished_requests() or pending:
        while pending and rng.random() < 0.4:
            engine.add_request(*pending.pop(0))
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out.outputs[0].token_ids
    return [finished[i] for i in range(len(work))]


def spy_can_run(runner):
    """Record (pure one-token step?, graph used?) for every step the graph runner sees."""
    seen = []
    original = runner.can_run

    def can_run(input_ids, meta):
        ok = original(input_ids, meta)
        seen.append((input_ids.shape[0] == meta.seq_lens.shape[0], ok))
        return ok
    runner.can_run = can_run
    return seen


# ------------------------------------------------------------------------------ buckets
def test_capture_batch_sizes():
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(5) == [1, 2, 4, 5]
    assert capture_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_batch_sizes(1000)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_batch_sizes(0)


def test_engine_config_validates_max_seq_len_to_capture():
    with pytest.raises(ValueError, match="max_seq_len_to_capture"):
        EngineConfig(max_seq_len_to_capture=0)


# ------------------------------------------------------------------ padding, cache writes
def decode_step(tables, context_lens, block_size, width, device, seed):
    """input_ids, positions, meta for one decode token per sequence: sequence i has
    context_lens[i] tokens in cache after the step, the last one fed now."""
    gen = torch.Generator().manual_seed(seed)
    num = len(tables)
    ids = torch.randint(3, VOCAB, (num,), generator=gen)
    pos = torch.tensor([n - 1 for n in context_lens])
    slots = torch.tensor([t[p // block_size] * block_size + p % block_size
                          for t, p in zip(tables, pos.tolist())])
    bt = torch.zeros((num, width), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=slots.to(device), block_tables=bt.to(device),
                             seq_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
                             query_start_loc=torch.arange(num + 1, dtype=torch.int32, device=device))
    return ids.to(device), pos.to(device), meta


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_never_write_and_logits_match_eager(device):
    """Random (sentinel) KV caches; two steps in the 4-bucket (4 then 3 sequences, the
    second with a narrower table): only the real rows' slots change, block 0 (what padded
    rows read) never does, stale rows and table columns return to padding, and logits
    equal an eager forward pass of the same step."""
    path = cached_checkpoint("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    model, config = load_model(path, dtype=torch.float32, device=device)
    block_size, num_blocks = 4, 16
    gen = torch.Generator().manual_seed(0)
    kv = [(torch.randn((num_blocks, block_size, 1, 64), generator=gen).to(device),
           torch.randn((num_blocks, block_size, 1, 64), generator=gen).to(device))
          for _ in range(config.num_hidden_layers)]
    before = [(k.clone(), v.clone()) for k, v in kv]
    capturer = EagerCapturer() if device == "cpu" else make_capturer(device)
    if capturer is None:
        pytest.skip("fastllm._C has no CUDA kernels")
    runner = DecodeGraphRunner(model, kv, batch_sizes=[1, 2, 4, 8], max_blocks_per_seq=6,
                               vocab_size=config.vocab_size, device=device, capturer=capturer)
    runner.capture()
    for (k, v), (k0, v0) in zip(kv, before):     # warm-ups and captures wrote nothing
        assert torch.equal(k, k0) and torch.equal(v, v0)

    steps = [([[3, 4, 5], [6], [7, 8], [9, 10]], [10, 2, 7, 8], 3),
             ([[11, 12], [13], [14]], [6, 3, 4], 2)]
    for n, (tables, lens, width) in enumerate(steps):
        ids, pos, meta = decode_step(tables, lens, block_size, width, device, seed=n)
        eager_kv = [(k.clone(), v.clone()) for k, v in kv]
        with torch.inference_mode():
            want = model(ids, pos, eager_kv, meta)
            got = runner.run(ids, pos, meta).clone()
        assert got.shape == (len(tables), config.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        written = meta.slot_mapping.tolist()
        for (k, v), (ek, ev), (k0, v0) in zip(kv, eager_kv, before):
            for cache, eager, old in ((k, ek, k0), (v, ev, v0)):
                flat, eflat, oflat = (c.view(-1, *c.shape[2:]) for c in (cache, eager, old))
                torch.testing.assert_close(flat[written], eflat[written], rtol=1e-4, atol=1e-5)
                keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
                keep[written] = False
                assert torch.equal(flat[keep], oflat[keep]), "a slot outside slot_mapping changed"
                assert torch.equal(cache[0], old[0]), "block 0 (padding reads) was written"
                old.view(-1, *old.shape[2:])[written] = flat[written]
        assert runner.replay_counts[4] == n + 1
    # After the 3-row step, row 3 is padding again and columns past width 2 are zero.
    assert runner.slot_mapping[3].item() == -1 and runner.seq_lens[3].item() == 1
    assert runner.input_ids[3].item() == 0 and runner.positions[3].item() == 0
    assert not runner.block_tables[3:].any() and not runner.block_tables[:, 2:].any()
    assert runner.query_start_loc.tolist() == list(range(9))


def test_can_run_only_one_token_steps_that_fit():
    model = torch.nn.Identity()
    runner = DecodeGraphRunner(model, [], batch_sizes=[1, 2, 4], max_blocks_per_seq=3,
                               vocab_size=8, device="cpu", capturer=EagerCapturer())
    meta = lambda s, w: AttentionMetadata(torch.zeros(s), torch.zeros((s, w), dtype=torch.int32),
                                          torch.ones(s, dtype=torch.int32),
                                          torch.arange(s + 1, dtype=torch.int32))
    assert not runner.can_run(torch.zeros(3), meta(3, 2))       # not captured yet
    runner._replays = {b: None for b in runner.batch_sizes}
    assert runner.can_run(torch.zeros(3), meta(3, 2))
    assert not runner.can_run(torch.zeros(5), meta(3, 2))      # a prefill chunk in the step
    assert not runner.can_run(torch.zeros(5), meta(5, 2))      # more rows than the largest bucket
    assert not runner.can_run(torch.zeros(2), meta(2, 4))      # table wider than captured
    assert [runner.bucket_for(s) for s in (1, 2, 3, 4)] == [1, 2, 4, 4]


# ------------------------------------------------------------------------- the engine
SETTINGS = {
    "buckets": dict(max_num_seqs=16),
    "tiny_cache_recompute": dict(max_num_seqs=8, num_kv_blocks=12, block_size=8),
    "tiny_cache_swap": dict(max_num_seqs=8, num_kv_blocks=12, block_size=8, swap_space=0.01),
    "one_token_chunks": dict(max_num_seqs=4, max_num_batched_tokens=4),
    "short_capture": dict(max_num_seqs=16, max_seq_len_to_capture=24, block_size=8),
}
CASES = [("buckets", False), ("buckets", True), ("tiny_cache_recompute", False),
         ("tiny_cache_swap", True), ("one_token_chunks", False), ("short_capture", False)]


@pytest.mark.parametrize("name,arrive_over_time", CASES,
                         ids=[f"{n}-{'over_time' if t else 'at_once'}" for n, t in CASES])
def test_graph_engine_matches_transformers_and_eager(llama_case, eager_recorder, monkeypatch,
                                                      name, arrive_over_time):
    path, work, refs = llama_case
    engine = make_engine(path, **SETTINGS[name])
    graphs = engine.runner.graph_runner
    assert graphs is not None and eager_recorder[0].num_captures == len(graphs.batch_sizes)
    seen = spy_can_run(graphs)
    execute, one_token_chunks = engine.runner.execute, []

    def spy_execute(out):    # a one-token step that holds a prefill chunk (nothing sampled)
        if out.scheduled and all(s.num_tokens == 1 for s in out.scheduled):
            one_token_chunks.extend(s for s in out.scheduled if s.num_samples == 0)
        return execute(out)
    engine.runner.execute = spy_execute
    got = run(engine, work, arrive_over_time)
    for i, (g, ref) in enumerate(zip(got, refs)):
        assert g == ref, f"request {i} ({len(work[i][0])} prompt tokens) under {name}"

    monkeypatch.setattr(cuda_graphs, "make_capturer", lambda device: None)
    eager = make_engine(path, **SETTINGS[name])
    assert eager.runner.graph_runner is None
    assert run(eager, work, arrive_over_time) == got

    stats = engine.get_stats()
    used = set(graphs.replay_counts)
    assert sum(ok for _, ok in seen) == sum(graphs.replay_counts.values()) > 0
    assert all(one for one, ok in seen if ok)                     # mixed steps ran eagerly
    if name == "buckets" and not arrive_over_time:
        assert {1, 2, 4, 8, 16} <= used                           # e.g. 3, 5, 9 running seqs
    if name == "buckets" and arrive_over_time:
        assert stats.prefix_cache_hit_rate > 0
    if "tiny" in name:
        assert stats.num_preemptions > 0
    if name == "tiny_cache_swap":
        assert stats.num_swaps_out > 0
    if name == "one_token_chunks":                                # same shapes as a decode
        assert one_token_chunks
    if name == "short_capture":                                   # long sequences ran eagerly
        assert any(one and not ok for one, ok in seen)


@pytest.mark.parametrize("fail_at", [0, 2])
def test_capture_failure_falls_back_to_eager(llama_case, monkeypatch, caplog, fail_at):
    class Failing(EagerCapturer):
        def capture(self, fn):
            if self.num_captures == fail_at:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super().capture(fn)
    monkeypatch.setattr(cuda_graphs, "make_capturer", lambda device: Failing())
    path, work, refs = llama_case
    with caplog.at_level(logging.WARNING, logger="fastllm.engine.cuda_graphs"):
        engine = make_engine(path, max_num_seqs=8)
    assert engine.runner.graph_runner is None
    assert any("capture failed" in r.message and "operation not permitted" in r.message
               for r in caplog.records if r.levelno == logging.WARNING)
    assert run(engine, work[:4]) == refs[:4]


def test_enforce_eager_and_cpu_build_no_graphs(llama_case, monkeypatch):
    path = llama_case[0]
    assert make_capturer("cpu") is None
    assert make_engine(path).runner.graph_runner is None          # CPU: no capturer
    calls = []
    monkeypatch.setattr(cuda_graphs, "make_capturer", lambda device: calls.append(device) or EagerCapturer())
    assert make_engine(path, enforce_eager=True).runner.graph_runner is None
    assert calls == []


# ------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_cuda_graph_engine_matches_transformers_and_eager():
    """Real torch.cuda.CUDAGraph capture (head_dim 64: the native CUDA attention)."""
    if not ops.cuda_available():
        pytest.skip("fastllm._C has no CUDA kernels")
    path = cached_checkpoint("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    hf = load_hf_model(path)
    work = make_workload(seed=1)
    refs = [hf_greedy(hf, p, n) for p, n in work]
    engine = make_engine(path, device="cuda", max_num_seqs=16, num_kv_blocks=64)
    graphs = engine.runner.graph_runner
    assert graphs is not None, "capture failed (see the warning)"
    assert isinstance(graphs.capturer, cuda_graphs.CudaGraphCapturer)
    got = run(engine, work)
    assert got == refs
    assert {1, 2, 4, 8, 16} <= set(graphs.replay_counts)
    eager = make_engine(path, device="cuda", max_num_seqs=16, num_kv_blocks=64, enforce_eager=True)
    assert eager.runner.graph_runner is None
    assert run(eager, work) == got
