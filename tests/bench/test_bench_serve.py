"""`python -m fastllm.bench serve`: the statistics against hand-computed cases, the load
generator against a scripted SSE server (a test fixture that streams known chunks after
known sleeps), and one run against the real fastllm server."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from fastllm.bench.serve_load import (BenchRequest, Target, arrival_offsets, random_requests,
                                      run_load)
from fastllm.bench.serve_stats import RequestRecord, summarize

uvicorn = pytest.importorskip("uvicorn")


def test_summary_matches_hand_computed_case():
    records = [
        RequestRecord(sent=0.0, chunk_times=[0.1, 0.3, 0.6], end=0.7, output_tokens=3, prompt_tokens=5),
        RequestRecord(sent=0.2, chunk_times=[0.4, 0.5], end=1.2, output_tokens=4, prompt_tokens=7),
        RequestRecord(sent=0.5, end=0.55, error="HTTP 400: bad"),
    ]
    s = summarize(records)
    assert (s["num_requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["error_messages"] == ["HTTP 400: bad"]
    assert s["duration_s"] == pytest.approx(1.2)                 # first sent -> last end
    assert (s["total_output_tokens"], s["total_prompt_tokens"]) == (7, 12)   # failed one not counted
    assert s["request_throughput"] == pytest.approx(2 / 1.2)
    assert s["output_throughput"] == pytest.approx(7 / 1.2)
    assert s["total_token_throughput"] == pytest.approx(19 / 1.2)
    # TTFT 100, 200 ms; p99 interpolates between the two ranks: 100 + 0.99 * 100.
    assert s["ttft_ms"] == pytest.approx({"mean": 150.0, "p50": 150.0, "p99": 199.0})
    # ITL: A's gaps 200, 300 and B's 100 ms -> sorted 100, 200, 300; p99 = 200 + 0.98 * 100.
    assert s["itl_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p99": 298.0})
    # TPOT: A (0.7 - 0.1) / 2 = 300 ms, B (1.2 - 0.4) / 3 = 266.67 ms.
    assert s["tpot_ms"] == pytest.approx({"mean": 850 / 3, "p50": 850 / 3,
                                          "p99": 800 / 3 + 0.99 * 100 / 3})
    assert s["e2e_ms"] == pytest.approx({"mean": 850.0, "p50": 850.0, "p99": 997.0})


def test_summary_of_no_successes_has_no_nan():
    s = summarize([RequestRecord(sent=1.0, end=1.5, error="boom")])
    assert s["completed"] == 0 and s["errors"] == 1 and s["duration_s"] == pytest.approx(0.5)
    assert s["request_throughput"] == 0.0 and s["ttft_ms"]["p99"] == 0.0


def test_random_requests_are_seeded_and_within_range():
    a = random_requests(200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    assert a == random_requests(200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    assert a != random_requests(200, input_len=20, output_len=10, range_ratio=0.5, seed=4)
    words = [len(r.prompt.split()) for r in a]
    outs = [r.max_tokens for r in a]
    assert min(words) >= 10 and max(words) <= 30 and len(set(words)) > 5
    assert min(outs) >= 5 and max(outs) <= 15
    fixed = random_requests(5, input_len=7, output_len=3, seed=0)
    assert [len(r.prompt.split()) for r in fixed] == [7] * 5 and {r.max_tokens for r in fixed} == {3}
    with pytest.raises(ValueError, match="--range-ratio"):
        random_requests(1, 1, 1, range_ratio=1.0)
    with pytest.raises(ValueError, match="--num-prompts"):
        random_requests(0, 1, 1)


def test_poisson_arrivals():
    offsets = arrival_offsets(20000, request_rate=50.0, seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and (gaps >= 0).all()
    # Exponential gaps: mean 1/rate and standard deviation 1/rate (the CV of 1 of a Poisson process).
    assert gaps.mean() == pytest.approx(0.02, rel=0.05)
    assert gaps.std() == pytest.approx(0.02, rel=0.05)
    assert (arrival_offsets(4, math.inf, 0) == 0).all()
    with pytest.raises(ValueError, match="--request-rate"):
        arrival_offsets(4, 0.0, 0)


class ScriptedServer:
    """An ASGI app streaming OpenAI SSE: `max_tokens` tokens, two per text chunk, the first
    chunk after FIRST_S and the rest GAP_S apart; a prompt "fail" gets a 400 error body.
    Chat streams begin with a role-only chunk (which carries no text) and omit [DONE]."""
    FIRST_S, GAP_S = 0.15, 0.05

    def __init__(self):
        self.bodies = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http"
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.bodies.append(body)
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        if prompt == "fail":
            error = {"error": {"message": "no thanks", "type": "invalid_request_error",
                               "param": "prompt", "code": None}}
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(error).encode()})
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._stream(scope["path"] == "/v1/chat/completions", body, send)
        finally:
            self.in_flight -= 1

    async def _stream(self, chat, body, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(obj):
            await send({"type": "http.response.body", "body": f"data: {json.dumps(obj)}\n\n".encode(),
                        "more_body": True})

        if chat:
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        n = body["max_tokens"]
        for i in range(0, n, 2):
            await asyncio.sleep(self.FIRST_S if i == 0 else self.GAP_S)
            text = "ab" if i + 1 < n else "a"
            await event({"choices": [{"index": 0, "delta": {"content": text}} if chat
                                     else {"index": 0, "text": text}]})
        await event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n,
                                              "total_tokens": 11 + n}})
        await send({"type": "http.response.body", "body": b"" if chat else b"data: [DONE]\n\n"})


@pytest.fixture
def scripted():
    app = ScriptedServer()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_load_generator_measures_scripted_stream(scripted, endpoint):
    app, url = scripted
    requests = [BenchRequest("one two", 5), BenchRequest("fail", 5), BenchRequest("three", 4)]
    target = Target(base_url=url, model="m", endpoint=endpoint, ignore_eos=True)
    records = asyncio.run(run_load(target, requests))
    ok5, failed, ok4 = records
    assert failed.error == "HTTP 400: no thanks"
    # Tokens come from usage, not from the chunk count (chunks carry two tokens here).
    assert (ok5.output_tokens, ok5.prompt_tokens, len(ok5.chunk_times)) == (5, 11, 3)
    assert (ok4.output_tokens, len(ok4.chunk_times)) == (4, 2)
    # Lower bounds only: the server slept this long before each chunk (the role chunk of a
    # chat stream, sent at once, must not count as the first token).
    assert ok5.chunk_times[0] - ok5.sent >= ScriptedServer.FIRST_S
    assert min(np.diff(ok5.chunk_times)) >= ScriptedServer.GAP_S * 0.9
    s = summarize(records)
    assert (s["completed"], s["errors"], s["total_output_tokens"]) == (2, 1, 9)
    assert s["ttft_ms"]["p50"] >= 1000 * ScriptedServer.FIRST_S
    assert s["itl_ms"]["p50"] >= 1000 * ScriptedServer.GAP_S * 0.9
    # The three requests go out at once, so the server may see them in any order.
    body = next(b for b in app.bodies if "one two" in json.dumps(b.get("prompt", b.get("messages"))))
    assert sorted(b["max_tokens"] for b in app.bodies) == [4, 5, 5]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["model"] == "m" and body["max_tokens"] == 5
    assert ("messages" in body) == (endpoint == "chat")


def test_max_concurrency_caps_requests_in_flight(scripted):
    app, url = scripted
    requests = [BenchRequest("x", 3)] * 6
    records = asyncio.run(run_load(Target(base_url=url, model="m"), requests, max_concurrency=2))
    assert all(r.ok for r in records)
    assert app.max_in_flight == 2


def test_cli_writes_json_report(scripted, tmp_path):
    app, url = scripted
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastllm.bench", "serve", "--base-url", url, "--model", "m",
         "--num-prompts", "4", "--input-len", "3", "--output-len", "4", "--endpoint", "chat",
         "--request-rate", "20", "--seed", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "TTFT mean / p50 / p99 (ms)" in proc.stdout
    report = json.loads(out.read_text())
    assert (report["completed"], report["errors"], report["total_output_tokens"]) == (4, 0, 16)
    assert report["config"]["request_rate"] == "20.0"
    assert [len(b["messages"][0]["content"].split()) for b in app.bodies] == [3] * 4


def test_cli_rejects_bad_rate():
    proc = subprocess.run([sys.executable, "-m", "fastllm.bench", "serve", "--model", "m",
                           "--request-rate", "-1", "--base-url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 2 and "--request-rate" in proc.stderr


@pytest.fixture(scope="module")
def fastllm_server():
    """The real `python -m fastllm.serve` on a tiny random-weight checkpoint."""
    from checkpoints import cached_checkpoint
    from fastllm.bench.serve_compare import ServerProcess, fastllm_argv, free_port
    path = cached_checkpoint("llama")
    port = free_port()
    with ServerProcess("fastllm", fastllm_argv(str(path), port) + ["--num-kv-blocks", "128"],
                       port) as server:
        server.wait_healthy(120)
        yield server, path
    assert server.proc.returncode == 0, server.log_tail()


def _generation_tokens(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    import httpx
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "fastllm:generation_tokens_total")


@pytest.mark.parametrize("endpoint,flags", [("completions", ["--request-rate", "50"]),
                                            ("chat", ["--max-concurrency", "3"])])
def test_cli_against_fastllm_server(fastllm_server, tmp_path, endpoint, flags):
    server, path = fastllm_server
    transformers = pytest.importorskip("transformers")
    args = ["--num-prompts", "12", "--input-len", "8", "--output-len", "10", "--range-ratio", "0.5",
            "--seed", "5", "--temperature", "0.8"]
    out = tmp_path / "fastllm.json"
    before = _generation_tokens(server.url)
    proc = subprocess.run(
        [sys.executable, "-m", "fastllm.bench", "serve", "--base-url", server.url,
         "--endpoint", endpoint, "--ignore-eos", "--json", str(out), *args, *flags],
        capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr + server.log_tail()
    report = json.loads(out.read_text())
    requests = random_requests(12, 8, 10, range_ratio=0.5, seed=5)
    assert (report["completed"], report["errors"]) == (12, 0), report["error_messages"]
    # ignore_eos: every request ran to its max_tokens, counted by the server's usage and
    # by its own /metrics counter.
    assert report["total_output_tokens"] == sum(r.max_tokens for r in requests)
    assert _generation_tokens(server.url) - before == report["total_output_tokens"]
    if endpoint == "completions":   # the prompt as the checkpoint's own tokenizer counts it
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
        assert report["total_prompt_tokens"] == sum(len(tok(r.prompt)["input_ids"]) for r in requests)
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        dist = report[name]
        assert 0 < dist["p50"] <= dist["p99"], (name, dist)
    assert report["ttft_ms"]["p99"] <= report["e2e_ms"]["p99"]
    assert report["config"]["model"]                     # taken from /v1/models


@pytest.mark.slow
def test_compare_runs_both_servers(tmp_path):
    """--compare on a tiny checkpoint: both servers come up, serve the same greedy
    requests to the end, and the ratios are fastllm's numbers over transformers'."""
    pytest.importorskip("transformers")
    from checkpoints import cached_checkpoint
    from fastllm.bench.serve_compare import transformers_argv
    try:
        transformers_argv("unused", 0)
    except ValueError as e:
        pytest.skip(str(e))
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastllm.bench", "serve", "--compare",
         "--checkpoint", str(cached_checkpoint("llama")), "--num-prompts", "3",
         "--input-len", "4", "--output-len", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    fast, hf = result["fastllm"], result["transformers"]
    for summary in (fast, hf):
        assert (summary["completed"], summary["errors"]) == (3, 0), summary["error_messages"]
        assert summary["config"]["ignore_eos"] is False        # the same body for both
    # Same weights, same prompts, greedy: the same number of prompt and output tokens.
    assert fast["total_prompt_tokens"] == hf["total_prompt_tokens"]
    assert fast["total_output_tokens"] == hf["total_output_tokens"]
    ratio = result["ratio_fastllm_over_transformers"]
    assert ratio["output_throughput"] == pytest.approx(fast["output_throughput"] / hf["output_throughput"])
    assert ratio["ttft_ms.p50"] == pytest.approx(fast["ttft_ms"]["p50"] / hf["ttft_ms"]["p50"])
    assert "fastllm / transformers:" in proc.stdout
