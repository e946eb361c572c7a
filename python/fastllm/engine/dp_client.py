"""DPClient: N engine replicas, each in its own process, behind LLMEngine's interface.

    client = DPClient("path/to/model", 2, replica_kwargs={"device": "cpu", ...})
    client.add_request("r0", "Hello", SamplingParams(max_tokens=8))
    while client.has_unfinished_requests():
        for out in client.step(): ...
    client.close()

LLM(..., data_parallel_size=N) holds one as its llm_engine, so LLM.generate, the CLI and
AsyncLLM (the server) drive it exactly as they drive one engine. Each replica
(engine/dp_replica.py) builds its engine as LLM does, on cuda:i on GPUs or on the CPU
with torch's threads split between the replicas. The front end tokenizes prompts, picks
a replica per request (fastllm.distributed.dp_router: lowest 4 * waiting + running,
prefix affinity on ties), sends the request there and collects RequestOutputs.

Errors surface as LLMEngine's do: step() raises, and the requests the error cost are no
longer unfinished. An add the replica refuses raises its ValueError from step() -- or,
after enable_acceptance_reports() (AsyncLLM), is reported by take_acceptances() so the
server can answer 400. A replica that dies fails its own requests with ReplicaDiedError;
the client then takes no new requests, the other replicas finish what they hold and are
stopped, and close() reaps every process.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import time
import weakref
from multiprocessing.connection import wait
from typing import Optional, Union

from fastllm.distributed.dp_router import DPRouter
from fastllm.engine.async_llm import EngineStepError, RequestAbortedError
from fastllm.engine.dp_replica import replica_main
from fastllm.engine.dp_stats import merge_replica_stats
from fastllm.outputs import RequestOutput
from fastllm.sampling_params import SamplingParams
from fastllm.utils import check_positive_int

logger = logging.getLogger(__name__)

_POLL_S = 0.02            # longest step() waits for replica events before returning
_STOP_TIMEOUT_S = 30.0    # a replica asked to stop gets this long before SIGKILL
_LATENCY_RECORDS = 10_000


class ReplicaDiedError(EngineStepError):
    """A data-parallel replica process exited; the requests it held are lost."""


class _Replica:
    """The front end's side of one replica process."""

    def __init__(self, index: int, process, commands, events):
        self.index, self.process, self.commands, self.events = index, process, commands, events
        self.info = None
        self.stats = None
        self.latencies: collections.deque = collections.deque(maxlen=_LATENCY_RECORDS)
        self.alive = True
        self.stopping = False

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclasses.dataclass
class Placement:
    """Where one replica runs: the device its LLM is given and, on GPUs, the GPUs its
    process sees (CUDA_VISIBLE_DEVICES), so a tensor-parallel replica's ranks find theirs
    at cuda:0..world_size-1 without knowing about data parallelism."""
    device: str
    visible_gpus: Optional[str] = None


def visible_gpu_ids() -> list[str]:
    import torch
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def replica_placements(device: str, num_replicas: int, world_size: int = 1) -> list[Placement]:
    """Replica i on GPUs [i * world_size, (i + 1) * world_size) of the visible ones, or
    every replica on the CPU."""
    import torch
    kind = str(device)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return [Placement("cpu") for _ in range(num_replicas)]
    if kind not in ("auto", "cuda"):
        raise ValueError(f"device={device!r}: with data_parallel_size={num_replicas} give "
                         f"'auto', 'cuda' (replica i runs on its own GPUs) or 'cpu'")
    gpus = visible_gpu_ids()
    need = num_replicas * world_size
    if len(gpus) < need:
        raise ValueError(f"data_parallel_size={num_replicas} x {world_size} GPU(s) per replica "
                         f"needs {need} GPUs but {len(gpus)} are visible")
    return [Placement("cuda:0" if world_size == 1 else "cuda",
                      ",".join(gpus[i * world_size:(i + 1) * world_size]))
            for i in range(num_replicas)]


class DPClient:
    # After a replica dies the others finish what they hold (AsyncLLM keeps stepping).
    drains_on_failure = True

    def __init__(self, model: str, data_parallel_size: int, replica_kwargs: dict,
                 tokenizer=None):
        check_positive_int("data_parallel_size", data_parallel_size)
        self.num_replicas = data_parallel_size
        self.replicas: list[_Replica] = []
        self._unfinished: set[str] = set()
        # Adds sent, not yet answered: request id -> the add's sequence number, so that
        # the answer to an earlier add under a reused id is not taken for this one.
        self._unaccepted: dict[str, int] = {}
        self._add_seq = itertools.count()
        self._errors: collections.deque = collections.deque()   # (error, request ids)
        self._acceptances: list = []
        self._report_acceptances = False
        self.dead_error: Optional[str] = None
        self._closed = False
        # What fails here fails in a moment, before any process starts.
        placements = _check_launch(model, data_parallel_size, replica_kwargs)
        if tokenizer is None:
            from fastllm.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(model)
        self.tokenizer = tokenizer
        # Reaps whatever started, on close(), garbage collection or exit.
        self._finalizer = weakref.finalize(self, _reap, self.replicas)
        try:
            self._start(model, replica_kwargs, placements)
            for rep in self.replicas:
                _await_ready(rep)
        except BaseException:
            self.close()
            raise
        first = self.replicas[0].info
        self.config, self.model_config = first.engine_config, first.model_config
        self.router = DPRouter(data_parallel_size, self.config.block_size)

    # -- processes -----------------------------------------------------------------------
    def _start(self, model: str, replica_kwargs: dict, placements: list[Placement]) -> None:
        import torch
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        # CPU replicas share the cores; GPU replicas keep torch's default.
        threads = None
        if placements[0].device == "cpu":
            threads = max(1, torch.get_num_threads() // self.num_replicas)
        for i, place in enumerate(placements):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            ev_recv, ev_send = ctx.Pipe(duplex=False)
            kwargs = dict(replica_kwargs, model=model, device=place.device)
            # Not a daemon: a replica may spawn its own tensor-parallel workers.
            proc = ctx.Process(target=replica_main, name=f"fastllm-dp{i}", daemon=False,
                               args=(i, kwargs, threads, place.visible_gpus, cmd_recv, ev_send))
            with _environ("CUDA_VISIBLE_DEVICES", place.visible_gpus):
                proc.start()              # the child's CUDA sees only its GPUs from the start
            cmd_recv.close()              # the child's ends: closing ours makes EOF mean death
            ev_send.close()
            self.replicas.append(_Replica(i, proc, cmd_send, ev_recv))

    @property
    def replica_pids(self) -> list[int]:
        return [rep.pid for rep in self.replicas]

    @property
    def is_healthy(self) -> bool:
        """False once a replica died (no new requests; /health 503) or after close()."""
        return self.dead_error is None and not self._closed

    def close(self) -> None:
        """Stop every replica (idempotent): a stop command, SIGKILL if it is not gone in
        _STOP_TIMEOUT_S."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int], None],
                    sampling_params: Optional[SamplingParams] = None, *,
                    prompt_token_ids: Optional[list[int]] = None,
                    arrival_time: Optional[float] = None, delta: bool = False) -> None:
        """Route and send a request; the replica's engine validates it (see the module
        docstring for how a refusal comes back)."""
        if not self.is_healthy:
            raise RequestAbortedError("the data-parallel engine is not running"
                                      + (f": {self.dead_error}" if self.dead_error else ""))
        rid = str(request_id)
        if rid in self._unfinished:
            raise ValueError(f"request_id {rid!r} is already in flight")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._prompt_ids(prompt, prompt_token_ids)
        replica = self.replicas[self.router.route(rid, ids)]
        self._unfinished.add(rid)
        seq = self._unaccepted[rid] = next(self._add_seq)
        self._send(replica, ("add", seq, rid, text, ids, params, delta,
                             arrival_time if arrival_time is not None else time.time()))

    def _prompt_ids(self, prompt, prompt_token_ids) -> tuple[Optional[str], list[int]]:
        if prompt_token_ids is not None:
            return (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the engine has no tokenizer; pass token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    def abort_request(self, request_id) -> None:
        """One id or an iterable of them; unknown or finished ids are ignored."""
        is_many = isinstance(request_id, (list, tuple, set, frozenset))
        by_replica = collections.defaultdict(list)
        for rid in (list(request_id) if is_many else [request_id]):
            rid = str(rid)
            replica = self.router.finish(rid)
            if replica is not None:
                self._unfinished.discard(rid)
                self._unaccepted.pop(rid, None)
                by_replica[replica].append(rid)
        for index, ids in by_replica.items():
            self._send(self.replicas[index], ("abort", ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished or self._errors)

    def get_num_unfinished_requests(self) -> int:
        return len(self._unfinished)

    def get_unfinished_request_ids(self) -> set[str]:
        return set(self._unfinished)

    def enable_acceptance_reports(self) -> None:
        """Report each add's outcome through take_acceptances() instead of raising a
        refusal from step(): AsyncLLM resolves its add_request with it."""
        self._report_acceptances = True

    def take_acceptances(self) -> list[tuple[str, Optional[BaseException]]]:
        taken, self._acceptances = self._acceptances, []
        return taken

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """The outputs the replicas sent since the last call, waiting up to _POLL_S for
        some. Raises an error the replicas reported (one per call, its requests dropped)."""
        if self._errors:
            self._raise_error_now()
        outputs: list[RequestOutput] = []
        live = [rep for rep in self.replicas if rep.alive]
        if live:
            waitables = [rep.events for rep in live] + [rep.process.sentinel for rep in live]
            ready = set(wait(waitables, timeout=_POLL_S))
            for rep in live:
                if rep.events in ready or rep.process.sentinel in ready:
                    self._drain(rep, outputs)
        self._stop_idle_survivors()
        if self._errors and not outputs:
            self._raise_error_now()
        return outputs

    def _raise_error_now(self) -> None:
        error, ids = self._errors.popleft()
        self._unfinished.difference_update(ids)
        raise error

    def _drain(self, rep: _Replica, outputs: list) -> None:
        closed = False
        try:
            while rep.events.poll(0):
                self._on_event(rep, rep.events.recv(), outputs)
        except (EOFError, OSError):            # the process is gone (its messages all read)
            closed = True
        if closed or not rep.process.is_alive():
            self._on_death(rep)

    def _on_event(self, rep: _Replica, event: tuple, outputs: list) -> None:
        kind = event[0]
        if kind == "outputs":
            _, outs, stats = event
            for out in outs:
                rid = out.request_id
                if (rid not in self._unfinished or rid in self._unaccepted
                        or self.router.replica_of(rid) != rep.index):
                    continue                      # aborted meanwhile (maybe the id reused)
                self.router.mark_running(out.request_id)
                if out.finished:
                    self.router.finish(out.request_id)
                    self._unfinished.discard(out.request_id)
                outputs.append(out)
            if stats is not None:
                rep.latencies.extend(stats.requests)
                rep.stats = stats
        elif kind == "accepted":
            for seq, rid, error in event[1]:
                self._on_accepted(seq, rid, error)
        elif kind == "step_failed":
            _, ids, message = event
            self._fail(ids, EngineStepError(f"data-parallel replica {rep.index}: the engine "
                                            f"step failed: {message}"))

    def _on_accepted(self, seq: int, rid: str, error: Optional[BaseException]) -> None:
        if self._unaccepted.get(rid) != seq:
            return                                # aborted meanwhile
        del self._unaccepted[rid]
        if error is None:
            if self._report_acceptances:
                self._acceptances.append((rid, None))
            return
        self.router.finish(rid)
        if self._report_acceptances:
            self._unfinished.discard(rid)
            self._acceptances.append((rid, error))
        else:
            self._errors.append((error, [rid]))   # _unfinished drops it when raised

    def _fail(self, ids: list[str], error: BaseException) -> None:
        """These requests are lost: raise `error` for them (once) from step()."""
        known = [rid for rid in ids if rid in self._unfinished]
        for rid in known:
            self.router.finish(rid)
            if rid in self._unaccepted and self._report_acceptances:
                self._acceptances.append((rid, error))
            self._unaccepted.pop(rid, None)
        if known:
            self._errors.append((error, known))

    def _on_death(self, rep: _Replica) -> None:
        if not rep.alive:
            return
        rep.alive = False
        if rep.stopping:
            return                                # we asked it to stop; close() joins it
        rep.process.join(5)                       # for its exit code
        message = (f"data-parallel replica {rep.index} (pid {rep.pid}) died "
                   f"(exit code {rep.process.exitcode})")
        logger.error("%s; failing its requests and stopping the others", message)
        self.dead_error = message
        for i in range(self.num_replicas):
            self.router.exclude(i)
        self._fail(self.router.requests_on(rep.index), ReplicaDiedError(message))

    def _stop_idle_survivors(self) -> None:
        """After a death: each other replica stops once it holds no request."""
        if self.dead_error is None:
            return
        for rep in self.replicas:
            if rep.alive and not rep.stopping and not self.router.requests_on(rep.index):
                rep.stopping = True
                self._send(rep, ("stop",))

    def _send(self, rep: _Replica, message: tuple) -> None:
        try:
            rep.commands.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self._on_death(rep)

    # -- stats ---------------------------------------------------------------------------
    def get_stats(self):
        """Totals over the replicas, each replica's own EngineStats in `.replicas`."""
        return merge_replica_stats([dataclasses.replace(rep.stats, requests=list(rep.latencies))
                                    for rep in self.replicas])

    def reset_prefix_cache(self) -> None:
        raise NotImplementedError("reset_prefix_cache is not supported with data_parallel_size > 1")


def _check_launch(model: str, num_replicas: int, replica_kwargs: dict) -> list[Placement]:
    """Each replica's placement, after the checks that need no process."""
    from fastllm.config import ParallelConfig
    from fastllm.distributed.launch import torchrun_world_size
    if torchrun_world_size() is not None:
        raise ValueError(f"data_parallel_size={num_replicas} under torchrun: start one server "
                         f"per replica there (torchrun's ranks form one replica)")
    world_size = ParallelConfig(replica_kwargs.get("tensor_parallel_size", 1),
                                replica_kwargs.get("pipeline_parallel_size", 1)).world_size
    placements = replica_placements(replica_kwargs.get("device", "auto"), num_replicas,
                                    world_size)
    if not os.path.exists(model):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return placements


def _await_ready(rep: _Replica) -> None:
    """Wait for the replica's engine; raise its startup error (a bad model path stays a
    ValueError / FileNotFoundError) or say that it died."""
    kind, payload = "died", None
    if rep.events in wait([rep.events, rep.process.sentinel]):
        try:
            kind, payload = rep.events.recv()
        except EOFError:
            pass
    if kind == "ready":
        rep.info, rep.stats = payload, payload.stats
        return
    if kind == "startup_error":
        raise payload
    rep.process.join(5)
    raise RuntimeError(f"data-parallel replica {rep.index} exited while starting (exit code "
                       f"{rep.process.exitcode}; its error is on stderr). Replicas are spawned "
                       f"processes: a script that starts them needs "
                       f"`if __name__ == '__main__':` around its code")


@contextlib.contextmanager
def _environ(name: str, value: Optional[str]):
    """os.environ[name] = value for the block (a spawned child inherits it); None: as is."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _reap(replicas: list[_Replica]) -> None:
    """Stop and join every replica process (also run at interpreter exit, before
    multiprocessing's own exit hook would wait on them)."""
    for rep in replicas:
        if rep.process.is_alive():
            try:
                rep.commands.send(("stop",))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for rep in replicas:
        rep.process.join(max(0.0, deadline - time.monotonic()))
        if rep.process.is_alive():             # it ignores SIGTERM (see dp_replica)
            logger.warning("replica %d did not stop in %.0f s; killing it", rep.index,
                           _STOP_TIMEOUT_S)
            rep.process.kill()
            rep.process.join()
        rep.alive = False
        for conn in (rep.commands, rep.events):
            conn.close()
