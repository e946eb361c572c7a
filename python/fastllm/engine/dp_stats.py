"""Engine stats of data-parallel replicas summed into one EngineStats (each replica's
own kept in `.replicas`), what AsyncLLM publishes and /metrics reads."""
from __future__ import annotations

from fastllm.engine.stats import EngineStats

# Counters and gauges that add up across replicas.
_SUMMED = ("num_running", "num_waiting", "num_swapped", "kv_blocks_total", "kv_blocks_used",
           "num_preemptions", "num_swaps_out", "num_prompt_tokens_computed",
           "num_generation_tokens", "num_steps")


def _weighted_mean(values, weights) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total else 0.0


def merge_replica_stats(replicas: list[EngineStats]) -> EngineStats:
    """Sums of the counts; KV usage over the pooled blocks; slot utilization weighted by
    the blocks each replica holds, prefix hit rate by the prompt tokens it computed
    (replicas hold no shared state, so neither is exact pooled, only close)."""
    if not replicas:
        raise ValueError("replicas is empty")
    totals = {name: sum(getattr(r, name) for r in replicas) for name in _SUMMED}
    blocks_total = totals["kv_blocks_total"]
    requests = [lat for r in replicas for lat in r.requests]
    merged = dict(
        totals,
        kv_block_usage=totals["kv_blocks_used"] / blocks_total if blocks_total else 0.0,
        kv_slot_utilization=_weighted_mean([r.kv_slot_utilization for r in replicas],
                                           [r.kv_blocks_used for r in replicas]),
        prefix_cache_hit_rate=_weighted_mean([r.prefix_cache_hit_rate for r in replicas],
                                             [r.num_prompt_tokens_computed for r in replicas]),
        requests=requests, replicas=list(replicas))
    return EngineStats(**merged)
