"""Engine statistics: queue sizes, KV usage, prefix-cache hit rate, preemptions, latency."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Optional


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
        ])


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
