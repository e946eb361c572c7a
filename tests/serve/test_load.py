"""Many clients at once: all finish with the right text and usage; disconnecting clients
leave no KV blocks behind; a burst over --max-queue-len gets 429s and loses nothing."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from fastllm import SamplingParams
from server_process import MODEL_NAME

openai = pytest.importorskip("openai")


def prompts(count: int) -> list[str]:
    words = ["cat", "Paris", "fox", "blocks", "seven", "hello", "model", "time"]
    return [f"{words[i % 8]} {i} {words[(i * 3) % 8]}" for i in range(count)]


def test_64_concurrent_streaming_clients(server, offline_llm, hf_tokenizer):
    texts = prompts(64)
    max_tokens = [4 + i % 9 for i in range(64)]
    refs = offline_llm.generate(texts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                                use_tqdm=False)

    async def one(client, prompt, m):
        text, usage, finish = "", None, None
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=m,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, usage, finish

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                    timeout=120)
        try:
            return await asyncio.gather(*(one(client, p, m) for p, m in zip(texts, max_tokens)))
        finally:
            await client.close()
    results = asyncio.run(run())
    for prompt, ref, (text, usage, finish) in zip(texts, refs, results):
        out = ref.outputs[0]
        assert text == out.text and finish == out.finish_reason
        assert usage.prompt_tokens == len(hf_tokenizer.encode(prompt))
        assert usage.completion_tokens == len(out.token_ids)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def _wait_for(server, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        if predicate(metrics) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def test_disconnecting_clients_free_their_kv_blocks(server):
    before = _wait_for(server, lambda m: m["fastllm:num_requests_running"] == 0)
    max_tokens = 100

    async def leave_early(client, i):
        body = {"model": MODEL_NAME, "prompt": f"story {i}", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        got = 0
        async with client.stream("POST", server.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    assert "error" not in json.loads(line[6:])
                    got += 1
                    if got == 3:
                        break                      # hang up mid-stream
        return got

    async def give_up(client, i):
        """A non-streamed request whose client hangs up 50 ms in (a few steps of 100)."""
        body = {"model": MODEL_NAME, "prompt": f"wait {i}", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        try:
            await client.post(server.url + "/v1/completions", json=body, timeout=0.05)
        except httpx.TimeoutException:
            return "gave up"
        return "finished"

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            streams = asyncio.gather(*(leave_early(client, i) for i in range(20)))
            waits = asyncio.gather(*(give_up(client, i) for i in range(4)))
            return await streams, await waits
    streamed, waited = asyncio.run(run())
    assert streamed == [3] * 20 and waited == ["gave up"] * 4
    after = _wait_for(server, lambda m: m["fastllm:kv_cache_blocks_used"] == 0
                      and m["fastllm:num_requests_running"] == 0
                      and m["fastllm:num_requests_waiting"] == 0)
    assert after["fastllm:kv_cache_blocks_used"] == 0
    assert after["fastllm:num_requests_running"] == 0
    # Aborted, not run to the end: far fewer decode tokens than the full requests need.
    decoded = (after["fastllm:generation_tokens_computed_total"]
               - before["fastllm:generation_tokens_computed_total"])
    assert decoded < 24 * max_tokens / 2
    # They never finished, so they are not counted as finished by length...
    changed = {k: after[k] - before.get(k, 0) for k in after
               if k.startswith(("fastllm:request_success_total", "fastllm:http_requests_total"))
               and after[k] != before.get(k, 0)}
    assert "fastllm:request_success_total{finished_reason=length}" not in changed, changed
    # Counted as aborted instead (a give-up may hang up before its body was read).
    assert 20 <= changed["fastllm:request_success_total{finished_reason=abort}"] <= 24, changed
    # And the server still serves.
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_queue_full_burst_gets_429_and_loses_nothing(limited_server, offline_llm):
    """--max-queue-len 2: a burst of 24 gets some 429s (with Retry-After); every other
    request completes with the offline text, and the 429'd ones succeed when retried."""
    texts = prompts(24)
    refs = [o.outputs[0].text for o in offline_llm.generate(
        texts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    url = limited_server.url + "/v1/completions"

    def body(p):
        return {"model": MODEL_NAME, "prompt": p, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=120, headers=limited_server.headers) as client:
            return await asyncio.gather(*(client.post(url, json=body(p)) for p in texts))
    before = limited_server.metrics()
    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}
    assert 200 in statuses and 429 in statuses
    for prompt, ref, r in zip(texts, refs, responses):
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == ref
        else:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            again = httpx.post(url, json=body(prompt), headers=limited_server.headers, timeout=60)
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == ref
    after = limited_server.metrics()
    key = "fastllm:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == len(texts)
    assert after["fastllm:http_requests_total{status=429}"] - before.get(
        "fastllm:http_requests_total{status=429}", 0) == statuses.count(429)
    assert after["fastllm:num_requests_queued"] == 0
