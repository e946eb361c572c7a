"""KV-cache efficiency: how well paged blocks hold the tokens, against a contiguous cache.

A paged cache gives a sequence of L tokens ceil(L / block_size) blocks, so only its last
block has empty slots (< block_size of them). A contiguous cache, as in HF transformers
or pre-vLLM servers, reserves max_model_len slots per sequence up front. The report puts
the two side by side for the same sequences:

    report = kv_cache_report([17, 32, 5], block_size=16, max_model_len=128)
    print(format_kv_report(report))

From a live engine: `engine_kv_report(llm.llm_engine)` (the sequences it holds now), or
over a whole run, at its fullest step (a finished run holds nothing, so a final snapshot
would say nothing):

    with track_kv_peak(llm.llm_engine) as kv:
        llm.generate(prompts, params)
    print(format_kv_report(kv.report()))
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * bytes."""
    for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("dtype_bytes", dtype_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_cache_report(seq_lens: Sequence[int], block_size: int, max_model_len: int,
                    prefix_hits: int = 0, prefix_queries: int = 0, preemptions: int = 0,
                    bytes_per_token: Optional[int] = None) -> dict:
    """Block utilization and waste of sequences of these lengths (tokens held in KV).

    block_utilization  stored tokens / slots of the blocks allocated to them
    waste_pct          100 * empty slots / allocated slots (the last block's tail)
    contiguous_*       the same for max_model_len slots reserved per sequence
    memory_saving_x    contiguous slots / paged slots
    prefix_hit_rate    prefix_hits / prefix_queries (None when nothing was queried)
    *_bytes            with bytes_per_token (see kv_bytes_per_token)

    Blocks shared between sequences (prefix caching) count once per sequence here: this
    is the logical view; the block manager's own counters give the physical one."""
    _positive_int("block_size", block_size)
    _positive_int("max_model_len", max_model_len)
    seq_lens = list(seq_lens)
    for i, n in enumerate(seq_lens):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"seq_lens[{i}] must be a non-negative integer, got {n!r}")
        if n > max_model_len:
            raise ValueError(f"seq_lens[{i}] = {n} exceeds max_model_len = {max_model_len}")
    for name, v in (("prefix_hits", prefix_hits), ("prefix_queries", prefix_queries),
                    ("preemptions", preemptions)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if prefix_hits > prefix_queries:
        raise ValueError(f"prefix_hits ({prefix_hits}) exceeds prefix_queries ({prefix_queries})")
    if bytes_per_token is not None:
        _positive_int("bytes_per_token", bytes_per_token)

    tokens = sum(seq_lens)
    blocks = sum(-(-n // block_size) for n in seq_lens)
    slots = blocks * block_size
    contiguous_slots = len(seq_lens) * max_model_len
    report = {
        "num_seqs": len(seq_lens),
        "block_size": block_size,
        "max_model_len": max_model_len,
        "tokens_stored": tokens,
        "blocks_allocated": blocks,
        "slots_allocated": slots,
        "wasted_slots": slots - tokens,
        "block_utilization": tokens / slots if slots else None,
        "waste_pct": 100.0 * (slots - tokens) / slots if slots else None,
        "contiguous_slots": contiguous_slots,
        "contiguous_utilization": tokens / contiguous_slots if contiguous_slots else None,
        "contiguous_waste_pct": 100.0 * (contiguous_slots - tokens) / contiguous_slots
        if contiguous_slots else None,
        "memory_saving_x": contiguous_slots / slots if slots else None,
        "prefix_hits": prefix_hits,
        "prefix_queries": prefix_queries,
        "prefix_hit_rate": prefix_hits / prefix_queries if prefix_queries else None,
        "preemptions": preemptions,
        "bytes_per_token": bytes_per_token,
    }
    if bytes_per_token is not None:
        report.update(bytes_stored=tokens * bytes_per_token, paged_bytes=slots * bytes_per_token,
                      wasted_bytes=(slots - tokens) * bytes_per_token,
                      contiguous_bytes=contiguous_slots * bytes_per_token)
    return report


def format_kv_report(report: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    r = report
    lines = [
        f"KV cache: {r['num_seqs']} sequences, {r['tokens_stored']} tokens in "
        f"{r['blocks_allocated']} blocks of {r['block_size']} ({r['slots_allocated']} slots)",
        f"  block utilization {pct(r['block_utilization'])}, waste {num(r['waste_pct'], '.2f')}% "
        f"({r['wasted_slots']} empty slots)",
        f"  contiguous max_model_len={r['max_model_len']} reservation: {r['contiguous_slots']} slots, "
        f"utilization {pct(r['contiguous_utilization'])}, waste {num(r['contiguous_waste_pct'], '.2f')}%"
        f"; paged uses {num(r['memory_saving_x'], '.1f')}x less",
        f"  prefix cache hit rate {pct(r['prefix_hit_rate'])} "
        f"({r['prefix_hits']}/{r['prefix_queries']}), preemptions {r['preemptions']}",
    ]
    if r.get("bytes_per_token") is not None:
        lines.append(f"  memory: paged {_bytes(r['paged_bytes'])} (of which wasted "
                     f"{_bytes(r['wasted_bytes'])}) vs contiguous {_bytes(r['contiguous_bytes'])}")
    return "\n".join(lines)


def engine_kv_report(engine) -> dict:
    """kv_cache_report of the sequences an LLMEngine holds KV for right now (running ones;
    swapped-out KV lives in CPU memory), with its prefix-cache token counters and
    preemption count. Call it mid-run (e.g. each step, keeping the fullest) or after a
    run for the cumulative counters."""
    sched, bm = engine.scheduler, engine.block_manager
    seq_lens = [seq.num_computed_tokens for seq in sched.running]
    runner = getattr(engine, "runner", None)
    bytes_per_token = None
    if runner is not None and hasattr(runner, "kv_bytes_per_block"):
        bytes_per_token = runner.kv_bytes_per_block() // bm.block_size
    return kv_cache_report(seq_lens, bm.block_size, engine.config.max_model_len,
                           prefix_hits=int(bm.prefix_hit_tokens),
                           prefix_queries=int(bm.prefix_queried_tokens),
                           preemptions=int(sched.num_preemptions),
                           bytes_per_token=bytes_per_token)


class KVPeakTracker:
    """Keeps the engine's KV report at the step with the most blocks in use (the last
    such step: it holds the most tokens). observe() after each engine.step();
    overhead_s is the time observe() took, for callers that time the engine."""

    _COUNTERS = ("prefix_hits", "prefix_queries", "preemptions")

    def __init__(self, engine):
        self.engine = engine
        self.peak_blocks = -1
        self.peak: Optional[dict] = None
        self.overhead_s = 0.0
        start = engine_kv_report(engine)
        self._start = {k: start[k] for k in self._COUNTERS}

    def observe(self) -> None:
        t0 = time.perf_counter()
        used = self.engine.block_manager.num_used_blocks
        if used >= self.peak_blocks:
            self.peak_blocks, self.peak = used, engine_kv_report(self.engine)
        self.overhead_s += time.perf_counter() - t0

    def report(self) -> dict:
        """The peak step's sequences, with prefix-cache and preemption counts of this
        run only (the engine's counters since the tracker was made)."""
        now = engine_kv_report(self.engine)
        delta = {k: now[k] - self._start[k] for k in self._COUNTERS}
        delta["prefix_hit_rate"] = (delta["prefix_hits"] / delta["prefix_queries"]
                                    if delta["prefix_queries"] else None)
        return {**(self.peak if self.peak is not None else now), **delta}


@contextlib.contextmanager
def track_kv_peak(engine):
    """Observe the engine after every step() taken inside the block (LLM.generate
    included), by wrapping this engine instance's step for the duration."""
    tracker = KVPeakTracker(engine)
    step = engine.step

    def observed_step(*args, **kwargs):
        outputs = step(*args, **kwargs)
        tracker.observe()
        return outputs
    engine.step = observed_step
    try:
        yield tracker
    finally:
        del engine.step          # back to the class's method


def _positive_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
