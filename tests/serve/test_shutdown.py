"""SIGTERM while clients stream: the server stops taking connections, lets requests
finish for --shutdown-grace seconds, aborts the rest with an error, and exits 0. Every
client gets either a complete response or an error.

--max-num-seqs 1 runs requests one at a time, first come first served: the two short
ones (3 tokens) are ahead and finish within the grace period; the NUM_LONG long ones
(250 tokens each, 12000 steps in all: 6 steps per millisecond would be needed) cannot all
finish in it, so both outcomes happen."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

from server_process import MODEL_NAME, ServerProcess

GRACE_S = 2.0
SHORT, LONG = 3, 250
NUM_LONG = 48               # 47 streamed + 1 whole


async def _stream(client, url, max_tokens, started: asyncio.Event):
    """('complete' | 'error', seconds since the epoch when it ended)."""
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    events = []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                started.set()
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert "shutting down" in last["error"]["message"]
        return "error", time.monotonic()
    assert last["choices"][0]["finish_reason"] == "length"
    return "complete", time.monotonic()


async def _whole(client, url, max_tokens):
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    r = await client.post(url + "/v1/completions", json=body)
    if r.status_code == 503:
        assert "shutting down" in r.json()["error"]["message"]
        return "error", time.monotonic()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
    return "complete", time.monotonic()


async def _queued(client, url) -> float:
    """Requests admitted and still without a first token (read live at each scrape)."""
    text = (await client.get(url + "/metrics")).text
    line = next(l for l in text.splitlines() if l.startswith("fastllm:num_requests_queued "))
    return float(line.split()[1])


def test_sigterm_drains_then_exits_0(model_path):
    server = ServerProcess(model_path, "--num-kv-blocks", 128, "--shutdown-grace", GRACE_S,
                           "--max-model-len", 256, "--max-num-seqs", 1)
    url = server.url
    try:
        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                first = asyncio.Event()
                tasks = [asyncio.ensure_future(_stream(client, url, SHORT, first)),
                         asyncio.ensure_future(_stream(client, url, SHORT, asyncio.Event()))]
                await asyncio.wait_for(first.wait(), 60)
                tasks += [asyncio.ensure_future(_stream(client, url, LONG, asyncio.Event()))
                          for _ in range(NUM_LONG - 1)]
                tasks.append(asyncio.ensure_future(_whole(client, url, LONG)))
                deadline = time.monotonic() + 60
                while await _queued(client, url) < NUM_LONG - 1:          # the long ones are in line
                    assert time.monotonic() < deadline, "the long requests were not queued"
                    await asyncio.sleep(0.05)
                server.proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(0.3)
                # Draining: no new connections (refused), or a 503 on one that slipped in.
                try:
                    r = await client.post(url + "/v1/completions", json={"prompt": "x"},
                                          headers={"Connection": "close"})
                    assert r.status_code == 503
                except httpx.TransportError:
                    pass
                return await asyncio.gather(*tasks), signalled
        results, signalled = asyncio.run(run())
        outcomes = [r for r, _ in results]
        assert outcomes[:2] == ["complete", "complete"]
        assert set(outcomes[2:]) <= {"complete", "error"} and "error" in outcomes[2:]
        for outcome, ended in results:
            if outcome == "error":                     # aborted only once the grace was over
                assert ended - signalled >= GRACE_S - 0.05
        rc = server.proc.wait(timeout=60)
        assert rc == 0, server.output()
        assert "draining" in server.output()
    finally:
        server.stop()
