"""KV-cache efficiency report (fastllm.engine.stats): hand-built cases, input checks,
and a live engine."""
import pytest
import torch

from fastllm.bench import models
from fastllm.engine import stats
from fastllm.engine.stats import engine_kv_report, format_kv_report, kv_cache_report
from fastllm.config import EngineConfig
from fastllm.sampling_params import SamplingParams


def test_hand_built_case():
    # 17 tokens -> 2 blocks, 32 -> 2, 5 -> 1: 5 blocks = 80 slots for 54 tokens.
    r = kv_cache_report([17, 32, 5], block_size=16, max_model_len=64, prefix_hits=30,
                        prefix_queries=120, preemptions=3, bytes_per_token=8)
    assert r["tokens_stored"] == 54
    assert r["blocks_allocated"] == 5 and r["slots_allocated"] == 80
    assert r["wasted_slots"] == 26
    assert r["block_utilization"] == 54 / 80 == 0.675
    assert r["waste_pct"] == pytest.approx(32.5)
    # Contiguous: 3 sequences x 64 reserved slots.
    assert r["contiguous_slots"] == 192
    assert r["contiguous_utilization"] == 54 / 192
    assert r["contiguous_waste_pct"] == pytest.approx(100 * 138 / 192)   # 71.875
    assert r["memory_saving_x"] == 192 / 80 == 2.4
    assert r["prefix_hit_rate"] == 0.25 and r["preemptions"] == 3
    assert (r["bytes_stored"], r["paged_bytes"], r["wasted_bytes"], r["contiguous_bytes"]) == \
        (432, 640, 208, 1536)


def test_full_blocks_waste_nothing():
    r = kv_cache_report([16, 32, 48], block_size=16, max_model_len=48)
    assert r["block_utilization"] == 1.0 and r["waste_pct"] == 0.0
    assert r["prefix_hit_rate"] is None and "paged_bytes" not in r


def test_empty_and_zero_length_sequences():
    r = kv_cache_report([], block_size=16, max_model_len=64)
    assert r["block_utilization"] is None and r["waste_pct"] is None
    r = kv_cache_report([0, 1], block_size=4, max_model_len=8)
    assert r["blocks_allocated"] == 1 and r["block_utilization"] == 0.25
    assert "n/a" in format_kv_report(kv_cache_report([], 16, 64))


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_lens=[65], block_size=16, max_model_len=64), r"seq_lens\[0\]"),
    (dict(seq_lens=[3, -1], block_size=16, max_model_len=64), r"seq_lens\[1\]"),
    (dict(seq_lens=[3.5], block_size=16, max_model_len=64), r"seq_lens\[0\]"),
    (dict(seq_lens=[3], block_size=0, max_model_len=64), "block_size"),
    (dict(seq_lens=[3], block_size=16, max_model_len=0), "max_model_len"),
    (dict(seq_lens=[3], block_size=16, max_model_len=64, prefix_hits=5, prefix_queries=4), "prefix_hits"),
    (dict(seq_lens=[3], block_size=16, max_model_len=64, preemptions=-1), "preemptions"),
    (dict(seq_lens=[3], block_size=16, max_model_len=64, bytes_per_token=0), "bytes_per_token"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        kv_cache_report(**kwargs)


def test_shared_blocks_count_once():
    # Two sequences of 20 tokens sharing their first block (16 tokens): 3 distinct blocks.
    r = kv_cache_report([20, 20], block_size=16, max_model_len=64, block_fill=[16, 4, 4])
    assert r["blocks_allocated"] == 3 and r["tokens_stored"] == 24 and r["logical_tokens"] == 40
    assert r["block_utilization"] == 24 / 48
    assert r["contiguous_utilization"] == 40 / 128 and r["memory_saving_x"] == 128 / 48
    with pytest.raises(ValueError, match=r"block_fill\[1\]"):
        kv_cache_report([20], block_size=16, max_model_len=64, block_fill=[16, 17])


def test_generate_does_not_import_the_benchmarks():
    import subprocess
    import sys
    code = ("import sys, fastllm.generate; "
            "assert not any(m.startswith('fastllm.bench') for m in sys.modules), sorted(sys.modules)")
    env_path = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "python")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path})


def test_format_shows_the_numbers():
    text = format_kv_report(kv_cache_report([17, 32, 5], 16, 64, 30, 120, 3, bytes_per_token=8))
    assert "block utilization 67.5%, waste 32.50% (26 empty slots)" in text
    assert "2.4x less" in text and "hit rate 25.0% (30/120)" in text and "preemptions 3" in text


def test_engine_kv_report_matches_the_block_manager():
    loaded = models.load(random_weights="tiny", device="cpu", dtype="float32")
    engine = models.make_engine(loaded, EngineConfig(block_size=4, num_kv_blocks=64))
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    for i, n in enumerate([3, 6, 9]):
        engine.add_request(f"r{i}", torch.randint(0, 512, (n,)).tolist(), params)
    for _ in range(3):
        engine.step()
    running = engine.scheduler.running
    assert len(running) == 3
    report = engine_kv_report(engine)
    lens = [seq.num_computed_tokens for seq in running]
    assert report["tokens_stored"] == sum(lens)
    assert report["blocks_allocated"] == sum(len(seq.block_table) for seq in running)
    # No shared blocks here, so the logical and the block manager's physical view agree.
    assert report["block_utilization"] == pytest.approx(engine.block_manager.slot_utilization(running))
    assert report["max_model_len"] == 512 and report["block_size"] == 4
    # tiny preset: 2 layers x 2 KV heads x 16 dims x 2 x 4 bytes (float32).
    assert report["bytes_per_token"] == 2 * 2 * 16 * 2 * 4
    assert report["bytes_per_token"] * 4 == engine.runner.kv.bytes_per_block


def test_engine_kv_report_counts_a_shared_prefix_once():
    """Prefix-cached blocks held by several sequences: the report and the block manager
    (EngineStats.kv_slot_utilization) give the same utilization."""
    loaded = models.load(random_weights="tiny", device="cpu", dtype="float32")
    engine = models.make_engine(loaded, EngineConfig(block_size=4, num_kv_blocks=64))
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    prefix = list(range(10, 22))                         # 3 full blocks
    engine.add_request("first", prefix + [1], params)
    engine.step()                                        # its prefix blocks are now cached
    engine.add_request("second", prefix + [2, 3], params)
    engine.step()
    running = engine.scheduler.running
    assert len(running) == 2 and running[0].block_table[:3] == running[1].block_table[:3]
    report = engine_kv_report(engine)
    distinct = {b for seq in running for b in seq.block_table}
    assert report["blocks_allocated"] == len(distinct) < sum(len(s.block_table) for s in running)
    assert report["block_utilization"] == pytest.approx(engine.block_manager.slot_utilization(running))
    assert report["block_utilization"] == pytest.approx(engine.get_stats().kv_slot_utilization)
    assert report["logical_tokens"] == sum(s.num_computed_tokens for s in running)


def test_track_kv_peak_around_llm_generate():
    from checkpoints import cached_checkpoint
    from fastllm import LLM
    from fastllm.engine.stats import track_kv_peak
    llm = LLM(str(cached_checkpoint("llama")), device="cpu", block_size=4, num_kv_blocks=64)
    engine = llm.llm_engine
    prompts = [[5 + i for i in range(n)] for n in (3, 6, 9)]
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    with track_kv_peak(engine) as kv:
        llm.generate(prompts, params, use_tqdm=False)
    assert "step" not in vars(engine)           # the class's step() is back
    report = kv.report()
    # Fullest step: after the 4th (prompt + 3 decoded tokens computed; the 5th step
    # finishes and frees every sequence): lengths 6, 9, 12 in 2 + 3 + 3 blocks of 4.
    assert report["num_seqs"] == 3 and kv.peak_blocks == 8
    assert report["tokens_stored"] == 27 and report["slots_allocated"] == 32
    assert report["block_utilization"] == 27 / 32
    assert report["preemptions"] == 0
    assert report["prefix_queries"] == 3 + 6 + 9    # every admitted prompt token is looked up


def test_kv_peak_tracker_builds_the_report_only_at_a_new_peak(monkeypatch):
    """Steady-state steps (same number of blocks in use) only read a counter: the
    O(blocks) report is built at the step a new peak is reached."""
    loaded = models.load(random_weights="tiny", device="cpu", dtype="float32")
    engine = models.make_engine(loaded, EngineConfig(block_size=16, num_kv_blocks=16))
    built = []
    original = stats.engine_kv_report
    monkeypatch.setattr(stats, "engine_kv_report", lambda e: built.append(e) or original(e))
    tracker = stats.KVPeakTracker(engine)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        tracker.observe()
        num_steps += 1
    # 3 + 7 computed tokens fit one block of 16 in every step: one peak, one report
    # (plus the tracker's starting counters).
    assert num_steps == 8 and tracker.peak_blocks == 1
    assert len(built) == 2
    assert tracker.peak["num_seqs"] == 1 and tracker.peak["blocks_allocated"] == 1


def test_track_kv_peak_nests():
    loaded = models.load(random_weights="tiny", device="cpu", dtype="float32")
    engine = models.make_engine(loaded, EngineConfig(block_size=4, num_kv_blocks=32))
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    with stats.track_kv_peak(engine) as outer:
        engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True,
                                                                temperature=0.0))
        engine.step()
        with stats.track_kv_peak(engine) as inner:
            engine.step()
        assert "step" in vars(engine)              # the outer wrapper is back
        engine.add_request("b", list(range(20, 29)), params)
        while engine.has_unfinished_requests():
            engine.step()
    assert "step" not in vars(engine)
    assert inner.peak_blocks == 2                  # "a" alone: 6 tokens in 2 blocks
    assert outer.peak_blocks == 2 + 3              # then "a" (7) and "b" (9) together
