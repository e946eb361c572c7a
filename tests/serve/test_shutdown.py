"""SIGTERM while clients stream: the server stops taking connections, lets requests
finish for --shutdown-grace seconds, aborts the rest with an error, and exits 0. Every
client gets either a complete response or an error.

The grace period (0.3 s) is long enough for the short requests' last few steps and far
too short for 250 decode steps on a CPU, so both outcomes happen here."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

from server_process import MODEL_NAME, ServerProcess

GRACE_S = 0.3
LONG = 250


async def _stream(client, url, max_tokens, started: asyncio.Event):
    """'complete' (finish_reason then [DONE]) or 'error' (an error event then [DONE])."""
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    events = []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            started.set()
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    if "error" in last:
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert "shutting down" in last["error"]["message"]
        return "error"
    assert last["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    return "complete" if text else "empty"


async def _whole(client, url, max_tokens):
    body = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    r = await client.post(url + "/v1/completions", json=body)
    if r.status_code == 503:
        assert "shutting down" in r.json()["error"]["message"]
        return "error"
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == max_tokens
    return "complete"


def test_sigterm_drains_then_exits_0(model_path):
    server = ServerProcess(model_path, "--num-kv-blocks", 128, "--shutdown-grace", GRACE_S,
                           "--max-model-len", 256)
    url = server.url
    try:
        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                short = [asyncio.Event() for _ in range(3)]
                long = [asyncio.Event() for _ in range(3)]
                tasks = [asyncio.ensure_future(_stream(client, url, 6, e)) for e in short]
                tasks += [asyncio.ensure_future(_stream(client, url, LONG, e)) for e in long]
                tasks.append(asyncio.ensure_future(_whole(client, url, LONG)))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in short + long)), 60)
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
                results = await asyncio.gather(*tasks)
                return results, time.monotonic() - signalled
        results, drained_in = asyncio.run(run())
        assert results[:3] == ["complete"] * 3          # short ones finish within the grace
        assert results[3:] == ["error"] * 4              # aborted at the end of the grace
        rc = server.proc.wait(timeout=60)
        assert rc == 0, server.output()
        log = server.output()
        assert "draining" in log
        assert drained_in >= GRACE_S - 0.05              # aborted only once the grace was over
    finally:
        server.stop()
