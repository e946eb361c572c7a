"""The statistics of `fastllm.bench serve`: one record per request in, one summary out.

A request's record holds what the client saw on the wire, in seconds on one monotonic
clock: when it was sent, when each chunk carrying text arrived, and when the stream
ended. Everything reported is derived from those times and the token counts:

    TTFT  first text chunk - sent
    ITL   gap between successive text chunks (a chunk may carry several tokens when the
          server groups them; vLLM's `bench serve` measures ITL the same way)
    TPOT  (E2E - TTFT) / (output tokens - 1): time per output token after the first
    E2E   end of stream - sent

Throughputs divide by the run's duration: first request sent to last stream ended.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

PERCENTILES = (50, 99)


@dataclass
class RequestRecord:
    sent: float                        # when the request left the client
    chunk_times: List[float] = field(default_factory=list)   # arrivals of text chunks
    end: Optional[float] = None        # when the stream ended (or failed)
    output_tokens: int = 0             # usage.completion_tokens, else the text chunk count
    prompt_tokens: Optional[int] = None   # usage.prompt_tokens when the server sent it
    error: Optional[str] = None        # None: the request completed

    @property
    def ok(self) -> bool:
        return self.error is None


def _distribution(values: Sequence[float], scale: float = 1000.0) -> Dict[str, float]:
    """mean and p50/p99 of `values` (seconds) in milliseconds; NaN-free: empty -> zeros."""
    if len(values) == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * scale
    # numpy's default percentile: linear interpolation between the closest ranks.
    return {"mean": float(arr.mean()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def summarize(records: Sequence[RequestRecord]) -> Dict[str, object]:
    """The report of one run; latencies in ms, throughputs per second."""
    done = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    duration = 0.0
    if records:
        ends = [r.end for r in records if r.end is not None]
        duration = (max(ends) if ends else 0.0) - min(r.sent for r in records)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    ttft = [r.chunk_times[0] - r.sent for r in done if r.chunk_times]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.end - r.chunk_times[0]) / (r.output_tokens - 1)
            for r in done if r.chunk_times and r.output_tokens > 1]
    e2e = [r.end - r.sent for r in done]
    return {
        "num_requests": len(records),
        "completed": len(done),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:5],
        "duration_s": duration,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(output_tokens + prompt_tokens),
        "ttft_ms": _distribution(ttft),
        "itl_ms": _distribution(itl),
        "tpot_ms": _distribution(tpot),
        "e2e_ms": _distribution(e2e),
    }


def format_report(summary: Dict[str, object], title: str = "serving benchmark") -> str:
    """A fixed-width table, as vLLM's `bench serve` prints."""
    lines = [f"{'=' * 18} {title} {'=' * 18}"]
    rows = [("requests (completed / sent)", f"{summary['completed']} / {summary['num_requests']}"),
            ("errors", summary["errors"]),
            ("duration (s)", f"{summary['duration_s']:.2f}"),
            ("prompt tokens", summary["total_prompt_tokens"]),
            ("output tokens", summary["total_output_tokens"]),
            ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("output throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
            ("total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}")]
    for name in ("ttft", "tpot", "itl", "e2e"):
        dist = summary[f"{name}_ms"]
        rows.append((f"{name.upper()} mean / p50 / p99 (ms)",
                     " / ".join(f"{dist[k]:.2f}" for k in ("mean", "p50", "p99"))))
    width = max(len(name) for name, _ in rows) + 2
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    lines += [f"error: {m}" for m in summary["error_messages"]]
    return "\n".join(lines)
