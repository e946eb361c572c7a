"""GET /metrics (Prometheus text format, prometheus-client) and per-request records.

Engine gauges and counters are read at scrape time from the latest EngineStats the
engine thread published (AsyncLLM.latest_stats); request latencies and token counts are
observed by the server as each request ends (RequestRecord). Every name starts with
`fastllm:` as vLLM's start with `vllm:`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class RequestRecord:
    """One HTTP request's generation: what the access log line and histograms report."""
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    finished: Optional[float] = None
    finish_reason: Optional[str] = None
    gaps: list = field(default_factory=list)     # seconds between outputs with tokens

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now
        self.completion_tokens += num_tokens

    def finish(self, reason: Optional[str]) -> None:
        if self.finished is None:
            self.finished = time.monotonic()
            self.finish_reason = reason

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def total(self) -> float:
        return (self.finished or time.monotonic()) - self.arrival


class _EngineCollector:
    def __init__(self, llm):
        self.llm = llm

    def collect(self):
        s = self.llm.latest_stats

        def gauge(name, doc, value):
            return GaugeMetricFamily(f"fastllm:{name}", doc, value=value)
        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("num_requests_swapped", "Requests swapped out to CPU memory.", s.num_swapped)
        yield gauge("num_requests_queued", "Requests admitted without a first token yet "
                    "(what --max-queue-len bounds).", self.llm.num_unstarted)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks held by requests (0-1).",
                    s.kv_block_usage)
        yield gauge("kv_cache_blocks_used", "KV blocks held by requests.", s.kv_blocks_used)
        yield gauge("kv_cache_blocks_total", "KV blocks in the pool.", s.kv_blocks_total)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / "
                    "prompt tokens admitted, since start.", s.prefix_cache_hit_rate)
        yield CounterMetricFamily("fastllm:num_preemptions", "Sequences preempted.",
                                  value=s.num_preemptions)
        yield CounterMetricFamily("fastllm:prompt_tokens_computed", "Prompt tokens fed to the "
                                  "model (prefill and recompute).",
                                  value=s.num_prompt_tokens_computed)
        yield CounterMetricFamily("fastllm:generation_tokens_computed", "Decode tokens fed to "
                                  "the model.", value=s.num_generation_tokens)
        yield CounterMetricFamily("fastllm:engine_steps", "Engine steps taken.", value=s.num_steps)
        yield from _replica_gauges(s)


def _replica_gauges(s):
    """Per data-parallel replica (one engine is replica 0); the unlabelled gauges above
    are the totals."""
    replicas = s.replicas or [s]
    families = {
        "num_requests_running": "Requests in the replica's running batch.",
        "num_requests_waiting": "Requests waiting in the replica's scheduler.",
        "kv_cache_usage_perc": "Fraction of the replica's KV blocks held by requests (0-1).",
    }
    fields = {"num_requests_running": "num_running", "num_requests_waiting": "num_waiting",
              "kv_cache_usage_perc": "kv_block_usage"}
    for name, doc in families.items():
        family = GaugeMetricFamily(f"fastllm:replica_{name}", doc, labels=["replica"])
        for i, r in enumerate(replicas):
            family.add_metric([str(i)], getattr(r, fields[name]))
        yield family


class ServerMetrics:
    def __init__(self, llm):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm))
        r = self.registry
        self.prompt_tokens = Counter("fastllm:prompt_tokens", "Prompt tokens of finished "
                                     "requests (usage.prompt_tokens).", registry=r)
        self.generation_tokens = Counter("fastllm:generation_tokens", "Generated tokens of "
                                         "finished requests (usage.completion_tokens).", registry=r)
        self.requests = Counter("fastllm:request_success", "Generation requests that ended, by "
                                "finish reason (stop, length; abort: the client left; error).",
                                ["finished_reason"], registry=r)
        self.http_requests = Counter("fastllm:http_requests", "HTTP requests answered, by status.",
                                     ["status"], registry=r)
        self.ttft = Histogram("fastllm:time_to_first_token_seconds", "Time to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastllm:inter_token_latency_seconds", "Time between outputs of a "
                             "request.", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fastllm:e2e_request_latency_seconds", "Arrival to last output.",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def observe(self, record: RequestRecord) -> None:
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        self.requests.labels(record.finish_reason or "error").inc()
        if record.ttft is not None:
            self.ttft.observe(record.ttft)
        for gap in record.gaps:
            self.itl.observe(gap)
        self.e2e.observe(record.total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
