"""What the completion, chat and /generate routes share: request fields -> SamplingParams,
admission (queue limit, draining), prompts into the engine, outputs merged and
accumulated per choice, logprobs in OpenAI's two shapes, client disconnects."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import Request

from fastllm.outputs import CompletionOutput, Logprob, RequestOutput
from fastllm.sampling_params import SamplingParams
from fastllm.serve.errors import APIError, from_value_error
from fastllm.serve.protocol import ChatLogprobToken, CompletionLogprobs, TopLogprob, UsageInfo
from fastllm.serve.structured import structured_field, structured_outputs_params

_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                    "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "ignore_eos", "min_tokens", "include_stop_str_in_output",
                    "skip_special_tokens")


def usage(record) -> UsageInfo:
    """Exact counts: prompt tokens of every prompt, tokens generated over all choices."""
    return UsageInfo(prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
                     total_tokens=record.prompt_tokens + record.completion_tokens)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req, state, max_tokens: Optional[int],
                    logprobs: Optional[int]) -> SamplingParams:
    """Fields the request gave, over the checkpoint's generation_config defaults
    (state.defaults); logprobs up to the engine's max_logprobs (--max-logprobs)."""
    if req.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias")
    if logprobs is not None and not 0 <= logprobs <= state.max_logprobs:
        raise APIError(f"logprobs must be in [0, {state.max_logprobs}], got {logprobs}",
                       param="logprobs")
    given = {name: getattr(req, name) for name in _SAMPLING_FIELDS}
    merged = {k: v for k, v in state.defaults.items() if k != "max_tokens"}
    merged.update((k, v) for k, v in given.items() if v is not None)
    merged.update(max_tokens=max_tokens, logprobs=logprobs,
                  structured_outputs=structured_outputs_params(req, state.config.disable_any_whitespace))
    try:
        return SamplingParams(**merged)
    except ValueError as e:
        raise from_value_error(e) from None


def check_model(state, name: Optional[str]) -> None:
    if name is not None and name not in state.config.served_model_names:
        raise APIError(f"the model {name!r} does not exist; this server serves "
                       f"{state.config.served_model_names}", param="model",
                       code="model_not_found")


def admit(state, num_requests: int) -> None:
    """429 while the queue (requests without a first token yet) is full; 503 while
    draining for shutdown."""
    if state.draining:
        raise APIError("the server is shutting down", 503)
    limit = state.config.max_queue_len
    if limit is not None and state.llm.num_unstarted + num_requests > limit:
        raise APIError(f"the queue is full ({state.llm.num_unstarted} requests waiting, "
                       f"--max-queue-len {limit}); retry later", 429,
                       code="queue_full", headers={"Retry-After": "1"})


async def add_requests(state, request_id: str, prompts: list[tuple[Optional[str], list[int]]],
                       params: SamplingParams, param_name: str, request_fields=None) -> list:
    """One engine request per prompt; all or none (the added ones are aborted on error).
    An invalid schema / regex / grammar (the engine's ValueError) names the request field
    that carried it."""
    streams = []
    try:
        for i, (text, ids) in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(await state.llm.add_request(rid, ids, params, text))
    except ValueError as e:
        for s in streams:
            s.abort()
        if "StructuredOutputsParams." in str(e) and params.structured_outputs is not None:
            raise APIError(str(e), param=structured_field(request_fields)) from None
        raise from_value_error(e, param=param_name) from None
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def merge_streams(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several request streams as they come; leaving early
    aborts every unfinished one."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].abort()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


@dataclass
class Choice:
    """One choice accumulated from deltas."""
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    text_offset: int = 0           # completions logprobs: characters of tokens so far

    def add(self, out: CompletionOutput) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


def new_deltas(out: RequestOutput, base_index: int, choices: dict):
    """(Choice, CompletionOutput delta, just_finished) for each of out's samples with
    something new; choices maps the OpenAI choice index to its Choice."""
    for sample in out.outputs:
        choice = choices[base_index + sample.index]
        if choice.finish_reason is not None:
            continue                       # finished before; later outputs repeat the reason
        if not (sample.text or sample.token_ids or sample.finish_reason):
            continue
        choice.add(sample)
        yield choice, sample, sample.finish_reason is not None


async def until_disconnected(request: Request, coro):
    """Run coro; if the client goes away first, cancel it (its streams abort) and raise
    ClientDisconnected."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


class ClientDisconnected(Exception):
    pass


@contextlib.contextmanager
def observed(state, record):
    """Count the request in the metrics exactly once, however the block ends: its finish
    reason, "abort" (client gone, cancelled) or "error"."""
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        record.finish("abort")
        raise
    except BaseException:
        record.finish("error")
        raise
    finally:
        state.metrics.observe(record)


# -- logprobs --------------------------------------------------------------------------

def token_text_fn(tokenizer):
    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    return token_text


def completion_logprobs(choice: Choice, token_ids, logprobs, token_text) -> CompletionLogprobs:
    """OpenAI completions shape for these tokens; text offsets continue choice's."""
    result = CompletionLogprobs()
    for tid, candidates in zip(token_ids, logprobs):
        text = token_text(tid)
        chosen: Optional[Logprob] = candidates.get(tid)
        result.tokens.append(text)
        result.token_logprobs.append(None if chosen is None else chosen.logprob)
        # Keyed by text: where pieces share one ("\ufffd" byte pieces), the best rank wins.
        by_rank = sorted(candidates.items(), key=lambda kv: -(kv[1].rank or 0))
        result.top_logprobs.append({token_text(i): lp.logprob for i, lp in by_rank})
        result.text_offset.append(choice.text_offset)
        choice.text_offset += len(text)
    return result


def chat_logprobs(token_ids, logprobs, num_top: int, token_text) -> list[ChatLogprobToken]:
    """OpenAI chat shape: each token with its top `num_top` candidates by rank."""
    entries = []
    for tid, candidates in zip(token_ids, logprobs):
        ranked = sorted((lp.rank or 0, i, lp.logprob) for i, lp in candidates.items()
                        if lp.rank is not None and lp.rank <= num_top)
        top = [TopLogprob(token=token_text(i), logprob=v, bytes=list(token_text(i).encode()))
               for _, i, v in ranked]
        text = token_text(tid)
        entries.append(ChatLogprobToken(token=text, bytes=list(text.encode()),
                                        logprob=candidates[tid].logprob,
                                        top_logprobs=top))
    return entries
