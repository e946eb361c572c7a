"""/metrics parses with prometheus-client's parser and moves with each request; the
access log has one line per request."""
from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server_process import MODEL_NAME

FAMILIES = {
    "fastllm:num_requests_running": "gauge", "fastllm:num_requests_waiting": "gauge",
    "fastllm:num_requests_swapped": "gauge", "fastllm:kv_cache_usage_perc": "gauge",
    "fastllm:prefix_cache_hit_rate": "gauge", "fastllm:num_preemptions": "counter",
    "fastllm:prompt_tokens": "counter", "fastllm:generation_tokens": "counter",
    "fastllm:time_to_first_token_seconds": "histogram",
    "fastllm:inter_token_latency_seconds": "histogram",
    "fastllm:e2e_request_latency_seconds": "histogram",
}


def test_metrics_parse_and_move(server, hf_tokenizer):
    text = httpx.get(server.url + "/metrics").text
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, name
    before = server.metrics()
    prompt = "The quick brown fox jumps"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 7, "temperature": 0,
            "ignore_eos": True}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    stream = {**body, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=stream, timeout=60) as r:
        assert sum(1 for line in r.iter_lines() if line.startswith("data: {")) >= 7
    after = server.metrics()

    def moved(key):
        return after[key] - before.get(key, 0)
    assert resp["usage"]["prompt_tokens"] == len(hf_tokenizer.encode(prompt))
    assert moved("fastllm:prompt_tokens_total") == 2 * resp["usage"]["prompt_tokens"]
    assert moved("fastllm:generation_tokens_total") == 2 * 7
    assert moved("fastllm:request_success_total{finished_reason=length}") == 2
    assert moved("fastllm:time_to_first_token_seconds_count") == 2
    assert moved("fastllm:e2e_request_latency_seconds_count") == 2
    assert moved("fastllm:inter_token_latency_seconds_count") == 2 * 6
    assert moved("fastllm:e2e_request_latency_seconds_sum") > 0
    assert moved("fastllm:generation_tokens_computed_total") >= 2 * 6
    assert moved("fastllm:http_requests_total{status=200}") >= 3      # + the first scrape
    assert 0 <= after["fastllm:kv_cache_usage_perc"] <= 1
    assert after["fastllm:kv_cache_blocks_total"] == 256
    # The access log line of the non-streamed request.
    deadline = time.monotonic() + 10
    while resp["id"] not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(l for l in server.output().splitlines() if resp["id"] in l)
    assert '"POST /v1/completions" 200' in line
    assert f"prompt_tokens={resp['usage']['prompt_tokens']} generated_tokens=7" in line
    assert "ttft=" in line and "total=" in line
