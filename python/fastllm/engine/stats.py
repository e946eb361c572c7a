"""Engine statistics: queue sizes, KV usage, prefix-cache hit rate, preemptions, latency,
and the KV-cache efficiency report.

KV-cache efficiency: how well paged blocks hold the tokens, against a contiguous cache.
A paged cache gives a sequence of L tokens ceil(L / block_size) blocks, so only its last
block has empty slots; a contiguous cache (HF transformers, pre-vLLM servers) reserves
max_model_len slots per sequence up front. The report puts the two side by side:

    report = kv_cache_report([17, 32, 5], block_size=16, max_model_len=128)
    print(format_kv_report(report))

From a live engine: `engine_kv_report(engine)` (the sequences it holds now), or over a
whole run at its fullest step (a finished run holds nothing):

    with track_kv_peak(llm.llm_engine) as kv:
        llm.generate(prompts, params)
    print(format_kv_report(kv.report()))

Block utilization has one definition here and in BlockManager.slot_utilization (what
EngineStats reports): tokens stored / slots of the distinct blocks held, a block shared
by several sequences (prefix caching, forks) counted once.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fastllm.utils import cdiv, check_positive_int


@dataclass
class RequestLatency:
    request_id: str
    ttft: Optional[float]          # seconds from arrival to the first token
    mean_itl: Optional[float]      # mean seconds between consecutive tokens of a sample
    num_output_tokens: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_blocks_total: int
    kv_blocks_used: int            # blocks held by requests (cached-free blocks are not used)
    kv_block_usage: float          # kv_blocks_used / kv_blocks_total
    kv_slot_utilization: float     # tokens stored / slots in the blocks running requests hold
    prefix_cache_hit_rate: float   # prompt tokens served from the cache / prompt tokens admitted
    num_preemptions: int
    num_swaps_out: int
    num_prompt_tokens_computed: int     # prefill (and recompute) tokens fed to the model
    num_generation_tokens: int          # decode tokens fed to the model
    num_steps: int
    requests: list[RequestLatency] = field(default_factory=list)   # finished, newest last
    # data_parallel_size > 1: each replica's own stats (index = replica); None for one engine
    replicas: Optional[list["EngineStats"]] = None

    @property
    def mean_ttft(self) -> Optional[float]:
        values = [r.ttft for r in self.requests if r.ttft is not None]
        return statistics.fmean(values) if values else None

    @property
    def mean_itl(self) -> Optional[float]:
        values = [r.mean_itl for r in self.requests if r.mean_itl is not None]
        return statistics.fmean(values) if values else None

    def format(self) -> str:
        def ms(x):
            return "n/a" if x is None else f"{x * 1e3:.1f} ms"
        return "\n".join([
            f"requests: running {self.num_running}, waiting {self.num_waiting}, "
            f"swapped {self.num_swapped}, finished {len(self.requests)}",
            f"KV blocks: {self.kv_blocks_used}/{self.kv_blocks_total} used "
            f"({self.kv_block_usage:.1%}), slot utilization {self.kv_slot_utilization:.1%}",
            f"prefix cache hit rate: {self.prefix_cache_hit_rate:.1%}",
            f"preemptions: {self.num_preemptions} (swapped out {self.num_swaps_out})",
            f"tokens computed: prompt {self.num_prompt_tokens_computed}, "
            f"generation {self.num_generation_tokens}, steps {self.num_steps}",
            f"latency: mean TTFT {ms(self.mean_ttft)}, mean inter-token {ms(self.mean_itl)}",
        ] + [f"replica {i}: running {r.num_running}, waiting {r.num_waiting}, finished "
             f"{len(r.requests)}, KV {r.kv_block_usage:.1%} used, steps {r.num_steps}"
             for i, r in enumerate(self.replicas or [])])


def request_latency(group) -> RequestLatency:
    """TTFT and mean inter-token latency of a finished SequenceGroup."""
    first = group.first_token_time
    gaps = []
    for seq in group.seqs:
        times = seq.token_times
        gaps.extend(b - a for a, b in zip(times, times[1:]))
    return RequestLatency(
        request_id=group.request_id,
        ttft=None if first is None else first - group.arrival_time,
        mean_itl=statistics.fmean(gaps) if gaps else None,
        num_output_tokens=sum(s.num_output_tokens for s in group.seqs))


# -- KV-cache efficiency report -------------------------------------------------------

def kv_cache_report(seq_lens: Sequence[int], block_size: int, max_model_len: int,
                    prefix_hits: int = 0, prefix_queries: int = 0, preemptions: int = 0,
                    bytes_per_token: Optional[int] = None,
                    block_fill: Optional[Sequence[int]] = None) -> dict:
    """Block utilization and waste of sequences of these lengths (tokens held in KV).

    block_utilization  stored tokens / slots of the distinct blocks holding them
    waste_pct          100 * empty slots / allocated slots (the last blocks' tails)
    contiguous_*       the same for max_model_len slots reserved per sequence
    memory_saving_x    contiguous slots / paged slots
    prefix_hit_rate    prefix_hits / prefix_queries (None when nothing was queried)
    *_bytes            with bytes_per_token (KVCache.bytes_per_block / block_size)

    block_fill: tokens in each distinct block the sequences hold (BlockManager.block_fill),
    when blocks are shared; without it every sequence is taken to own its blocks.
    logical_tokens is sum(seq_lens), what a contiguous cache stores (no sharing)."""
    seq_lens = list(seq_lens)
    block_fill = None if block_fill is None else list(block_fill)
    _check_report_inputs(seq_lens, block_size, max_model_len, prefix_hits, prefix_queries,
                         preemptions, bytes_per_token, block_fill)
    logical = sum(seq_lens)
    if block_fill is None:
        tokens = logical
        blocks = sum(cdiv(n, block_size) for n in seq_lens)
    else:
        tokens, blocks = sum(block_fill), len(block_fill)
    slots = blocks * block_size
    contiguous_slots = len(seq_lens) * max_model_len
    report = {
        "num_seqs": len(seq_lens),
        "block_size": block_size,
        "max_model_len": max_model_len,
        "tokens_stored": tokens,
        "logical_tokens": logical,
        "blocks_allocated": blocks,
        "slots_allocated": slots,
        "wasted_slots": slots - tokens,
        "block_utilization": tokens / slots if slots else None,
        "waste_pct": 100.0 * (slots - tokens) / slots if slots else None,
        "contiguous_slots": contiguous_slots,
        "contiguous_utilization": logical / contiguous_slots if contiguous_slots else None,
        "contiguous_waste_pct": 100.0 * (contiguous_slots - logical) / contiguous_slots
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


def _check_report_inputs(seq_lens: list, block_size, max_model_len, prefix_hits, prefix_queries,
                         preemptions, bytes_per_token, block_fill: Optional[list]) -> None:
    check_positive_int("block_size", block_size)
    check_positive_int("max_model_len", max_model_len)
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
        check_positive_int("bytes_per_token", bytes_per_token)
    if block_fill is not None:
        for i, n in enumerate(block_fill):
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= block_size:
                raise ValueError(f"block_fill[{i}] must be an integer in [0, {block_size}], got {n!r}")


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
    running = sched.running
    seq_lens = [seq.num_computed_tokens for seq in running]
    return kv_cache_report(seq_lens, bm.block_size, engine.config.max_model_len,
                           prefix_hits=int(bm.prefix_hit_tokens),
                           prefix_queries=int(bm.prefix_queried_tokens),
                           preemptions=int(sched.num_preemptions),
                           bytes_per_token=engine.runner.kv.bytes_per_block // bm.block_size,
                           block_fill=list(bm.block_fill(running).values()))


class KVPeakTracker:
    """Keeps the engine's KV report at the first step with the most blocks in use.
    observe() after each engine.step(): it reads one counter and builds the O(blocks)
    report only when a new peak is reached, so steady-state steps cost next to nothing.
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
        if used > self.peak_blocks:
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
    # An outer track_kv_peak's wrapper, if any: restored on exit (trackers nest).
    outer = vars(engine).get("step")
    step = engine.step

    def observed_step(*args, **kwargs):
        outputs = step(*args, **kwargs)
        tracker.observe()
        return outputs
    engine.step = observed_step
    try:
        yield tracker
    finally:
        if outer is not None:
            engine.step = outer
        else:
            del engine.step      # back to the class's method


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
