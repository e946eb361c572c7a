"""AsyncLLM: the engine stepped in one background thread, requests served to asyncio.

    llm = AsyncLLM(path, device="cpu")                      # LLM(...)'s keywords, or an LLM
    async for out in llm.generate("Hello", SamplingParams(max_tokens=8), "r0"):
        out.outputs[0].text                                   # only what is new (a delta)

LLMEngine is not thread-safe, so one thread owns it: it takes the queued add/abort
commands, steps the engine while anything is unfinished, and hands each step's
RequestOutputs to the event loop (call_soon_threadsafe), where every request has its own
queue. Stepping in a thread rather than an asyncio task keeps the event loop (HTTP
parsing, SSE writes) responsive while a step computes.

A failed step costs only the requests it aborted (LLMEngine.step drops them); each of
their streams raises the step's error and the loop goes on. Leaving a stream early
(break, cancellation, client gone) aborts the request, which frees its KV blocks at the
engine thread's next turn.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from fastllm.outputs import RequestOutput
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# While requests run, engine stats are published at most this often (get_stats walks the
# running sequences' blocks); always when the engine goes idle.
_STATS_INTERVAL_S = 0.25


class EngineStepError(RuntimeError):
    """A step failed; the requests it held were aborted (the cause is chained)."""


class RequestAbortedError(RuntimeError):
    """The server aborted the request (shutdown grace period over)."""


@dataclass
class _Add:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Inbox:
    """Commands from the event loop to the engine thread."""
    commands: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)

    def put(self, command) -> None:
        with self.lock:
            self.commands.append(command)
        self.wake.set()

    def take(self, block: bool) -> list:
        if block:
            self.wake.wait(timeout=1.0)
        with self.lock:
            commands, self.commands = self.commands, []
            self.wake.clear()
        return commands


class RequestStream:
    """One request's outputs on the event loop side; iterate it once."""

    def __init__(self, request_id: str, llm: "AsyncLLM"):
        self.request_id = request_id
        self._llm = llm
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.started = False          # a first output (or error) arrived

    def _mark_started(self) -> None:
        if not self.started:
            self.started = True
            self._llm.num_unstarted -= 1

    def _put(self, item: Union[RequestOutput, BaseException]) -> None:
        self._mark_started()
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort the request unless it finished (idempotent)."""
        self._mark_started()
        if not self.finished:
            self.finished = True
            self._llm._forget(self)
            self._llm.abort(self.request_id)


class AsyncLLM:
    def __init__(self, model=None, **llm_kwargs):
        """model: a fastllm.LLM, or what LLM(...) takes (a path, None for the default
        model) with its keywords. The engine is stepped only by this object's thread,
        started by start() or the first request."""
        if llm_kwargs or not hasattr(model, "llm_engine"):
            from fastllm.llm import LLM
            model = LLM(model, **llm_kwargs)
        llm = model
        self.llm = llm
        self.engine = llm.llm_engine
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.config.max_model_len
        self._inbox = _Inbox()
        self._streams: dict[str, RequestStream] = {}      # event loop side
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.dead_error: Optional[BaseException] = None   # the engine thread died of this
        self.latest_stats = self.engine.get_stats()      # replaced, never mutated
        self.num_unstarted = 0     # requests added that have had no output yet (queue length)
        # An engine in other processes (DPClient) learns whether an add was accepted a
        # step later; add_request waits for that answer (engine thread side).
        self._accepts_later = hasattr(self.engine, "take_acceptances")
        self._drains_on_failure = getattr(self.engine, "drains_on_failure", False)
        if self._accepts_later:
            self.engine.enable_acceptance_reports()
        self._awaiting_accept: dict[str, asyncio.Future] = {}

    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, **llm_kwargs) -> "AsyncLLM":
        from fastllm.llm import LLM
        return cls(LLM(model, **llm_kwargs))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fastllm-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive()
                and self.engine.is_healthy)

    async def shutdown(self) -> None:
        """Abort what is left, stop the thread and release the engine."""
        self.abort_all(RequestAbortedError("the server is shutting down"))
        self._stopping = True
        self._inbox.wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.engine.close()

    # -- requests (event loop side) ------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int],
                          params: SamplingParams, prompt: Optional[str] = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises the engine's
        ValueError for a request that can never run (too long, bad token ids)."""
        self.start()
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        stream = RequestStream(request_id, self)
        accepted = self._loop.create_future()
        self._streams[request_id] = stream
        self.num_unstarted += 1
        self._inbox.put(_Add(request_id, prompt, list(prompt_token_ids), params, accepted))
        try:
            await accepted
        except BaseException:        # refused, or the caller was cancelled meanwhile
            stream.abort()
            raise
        return stream

    async def generate(self, prompt: Union[str, list[int]], sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs as deltas (new text and tokens), the last one finished."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stream = await self.add_request(request_id, ids, sampling_params,
                                        prompt if isinstance(prompt, str) else None)
        async for out in stream:
            yield out

    def abort(self, request_id: Union[str, list[str]]) -> None:
        """Thread-safe; unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._inbox.put(_Abort(ids))

    def abort_all(self, error: BaseException) -> None:
        """Abort every request in flight; their streams raise `error`."""
        streams = list(self._streams.values())
        for stream in streams:
            stream._put(error)
            self._forget(stream)
        if streams:
            self._inbox.put(_Abort([s.request_id for s in streams]))

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def _check_alive(self) -> None:
        if self._drains_on_failure and not self.engine.is_healthy:   # DPClient: a replica died
            raise RequestAbortedError(f"the engine is not running: {self.engine.dead_error}")
        if self.dead_error is not None or self._stopping:
            raise RequestAbortedError("the engine is not running"
                                      + (f": {self.dead_error}" if self.dead_error else ""))

    def _deliver(self, outputs: list[RequestOutput], errors: dict[str, BaseException]) -> None:
        """Event loop side of a step: route outputs and errors to their streams."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream._put(out)
                if out.finished:
                    self._forget(stream)
        for rid, error in errors.items():
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._put(error)

    def _resolve(self, future: asyncio.Future, error: Optional[BaseException]) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        live: set[str] = set()         # requests the engine holds, as this thread knows
        last_stats = 0.0
        try:
            while not self._stopping:
                busy = self.engine.has_unfinished_requests()
                self._apply(self._inbox.take(block=not busy), live)
                outputs, errors = [], {}
                if self.engine.has_unfinished_requests():
                    outputs, errors = self._step(live)
                if self._accepts_later:
                    self._resolve_acceptances(live)
                if outputs or errors:
                    self._loop.call_soon_threadsafe(self._deliver, outputs, errors)
                # A parallel worker died: no step can run. (Data-parallel replicas that
                # survive a dead one finish their requests first: DPClient stops them.)
                if not self.engine.is_healthy and not self._drains_on_failure:
                    raise RuntimeError(f"the engine's workers failed: {self.engine.executor.failure}")
                now = time.monotonic()
                if now - last_stats >= _STATS_INTERVAL_S or not live:
                    self.latest_stats = self.engine.get_stats()
                    last_stats = now
            self._apply(self._inbox.take(block=False), live)    # the shutdown's aborts
            self._refuse_awaiting(RequestAbortedError("the server is shutting down"))
        except BaseException as e:          # a bug in this loop: fail everything, loudly
            logger.exception("the engine thread died")
            self.dead_error = e
            error = RequestAbortedError(f"the engine thread died: {e!r}")
            try:
                self._loop.call_soon_threadsafe(self.abort_all, error)
            except RuntimeError:            # the event loop is already closed
                pass

    def _apply(self, commands: list, live: set[str]) -> None:
        for cmd in commands:
            if isinstance(cmd, _Abort):
                known = [rid for rid in cmd.request_ids if rid in live]
                for rid in known:
                    self._awaiting_accept.pop(rid, None)
                if known:
                    self.engine.abort_request(known)
                    live.difference_update(known)
                continue
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params,
                                        prompt_token_ids=cmd.prompt_token_ids, delta=True)
            except Exception as e:           # ValueError: a 400; anything else: that request's 500
                if not isinstance(e, ValueError):
                    logger.exception("add_request(%r) failed", cmd.request_id)
                self._loop.call_soon_threadsafe(self._resolve, cmd.accepted, e)
            else:
                live.add(cmd.request_id)
                if self._accepts_later:
                    self._awaiting_accept[cmd.request_id] = cmd.accepted
                else:
                    self._loop.call_soon_threadsafe(self._resolve, cmd.accepted, None)

    def _resolve_acceptances(self, live: set[str]) -> None:
        for rid, error in self.engine.take_acceptances():
            future = self._awaiting_accept.pop(rid, None)
            if error is not None:
                live.discard(rid)
            if future is not None:
                self._loop.call_soon_threadsafe(self._resolve, future, error)

    def _refuse_awaiting(self, error: BaseException) -> None:
        for future in self._awaiting_accept.values():
            self._loop.call_soon_threadsafe(self._resolve, future, error)
        self._awaiting_accept.clear()

    def _step(self, live: set[str]) -> tuple[list[RequestOutput], dict[str, BaseException]]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # LLMEngine.step aborted the requests of the failed step; the rest go on.
            failed = live - self.engine.get_unfinished_request_ids()
            live.difference_update(failed)
            logger.error("engine step failed (%r); failing requests %s", e, sorted(failed))
            error = EngineStepError(f"the engine step failed: {e!r}")
            error.__cause__ = e
            return [], {rid: error for rid in failed}
        for out in outputs:
            if out.finished:
                live.discard(out.request_id)
        return outputs, {}
