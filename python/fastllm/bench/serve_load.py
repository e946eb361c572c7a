"""The load of `fastllm.bench serve`: random requests from a seed, sent on a schedule,
each streamed over SSE and timed chunk by chunk.

Prompts are random words from a fixed list: the common English words below are one
token each in most BPE vocabularies (with their leading space), so an `input_len`-word
prompt is about `input_len` tokens on any server, and the same seed gives every server
the same requests. The usage block the server streams gives the exact counts.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import httpx
import numpy as np

from fastllm.bench.serve_stats import RequestRecord

WORDS = ("the of and to in is was for on that with as by at from it his an are be this "
         "which or had not but have they were one all their has been more who can new "
         "her would two time there first after year also only other into most some "
         "over city then may many such when where about state school world these").split()

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    max_tokens: int


def sample_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    """n lengths uniform over [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's random set)."""
    low = max(1, int(math.floor(mean * (1 - range_ratio))))
    high = max(low, int(math.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def random_requests(num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> List[BenchRequest]:
    for name, value in (("--num-prompts", num_prompts), ("--input-len", input_len),
                        ("--output-len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    return [BenchRequest(" ".join(rng.choice(WORDS, size=int(n))), int(m))
            for n, m in zip(in_lens, out_lens)]


def arrival_offsets(num: int, request_rate: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each request is sent: a Poisson process of rate
    `request_rate` (exponential gaps, the first request at 0), or all at 0 for inf."""
    if not request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if math.isinf(request_rate):
        return np.zeros(num)
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / request_rate, size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


@dataclass
class Target:
    base_url: str                  # e.g. http://127.0.0.1:8000 (the /v1 paths are added)
    model: str
    endpoint: str = "completions"  # a key of ENDPOINTS
    temperature: float = 0.0
    ignore_eos: bool = False       # only for servers that accept the (vLLM) field
    api_key: Optional[str] = None

    def body(self, request: BenchRequest) -> Dict[str, object]:
        body: Dict[str, object] = {"model": self.model, "max_tokens": request.max_tokens,
                                   "temperature": self.temperature, "stream": True,
                                   "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def headers(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _chunk_text(chunk: dict) -> str:
    """The text of a completions (`text`) or chat (`delta.content`) chunk, "" for none."""
    text = ""
    for choice in chunk.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def _error_of(resp: httpx.Response) -> str:
    raw = (await resp.aread()).decode("utf-8", "replace")
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw[:200]
    return f"HTTP {resp.status_code}: {message}"


async def stream_one(client: httpx.AsyncClient, target: Target, request: BenchRequest) -> RequestRecord:
    """Send one streaming request and time it; never raises (failures land in .error)."""
    record = RequestRecord(sent=time.perf_counter())
    chunks = 0
    try:
        async with client.stream("POST", ENDPOINTS[target.endpoint], json=target.body(request),
                                 headers=target.headers()) as resp:
            if resp.status_code != 200:
                record.error = await _error_of(resp)
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        record.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                        break
                    if _chunk_text(chunk):
                        record.chunk_times.append(time.perf_counter())
                        chunks += 1
                    usage = chunk.get("usage")
                    if usage:
                        record.output_tokens = int(usage.get("completion_tokens", 0))
                        record.prompt_tokens = usage.get("prompt_tokens")
    except (httpx.HTTPError, ValueError) as e:   # connection lost, bad JSON in a chunk
        record.error = f"{type(e).__name__}: {e}"
    record.end = time.perf_counter()
    if record.ok and not record.output_tokens:   # no usage block: count text chunks
        record.output_tokens = chunks
    return record


async def run_load(target: Target, requests: Sequence[BenchRequest], request_rate: float = math.inf,
                   max_concurrency: Optional[int] = None, seed: int = 0,
                   timeout_s: float = 600.0) -> List[RequestRecord]:
    """Send `requests` on a Poisson schedule, at most `max_concurrency` in flight."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    offsets = arrival_offsets(len(requests), request_rate, seed)
    limit = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    # No client-side pool limit: queueing belongs to the server (or the semaphore).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=target.base_url, timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def send_at(offset: float, request: BenchRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with limit:
                return await stream_one(client, target, request)

        return list(await asyncio.gather(*(send_at(o, r) for o, r in zip(offsets, requests))))


async def first_model(base_url: str, api_key: Optional[str] = None, timeout_s: float = 30.0) -> str:
    """The id of the first model GET /v1/models lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as client:
            resp = await client.get("/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {base_url}/v1/models ({type(e).__name__}: {e})") from e
    if resp.status_code != 200:
        raise ValueError(f"GET {base_url}/v1/models answered {resp.status_code}; pass --model")
    models = resp.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]
