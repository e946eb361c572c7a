"""The engine's door to the model runner(s): one process, or a replica of tp * pp ranks.

    executor = UniprocExecutor(runner)                  # today's in-process runner
    executor = MultiprocExecutor.start(spec)            # world_size > 1 (spawned or torchrun)
    result = executor.execute(sched)                    # SchedulerOutput -> RunnerOutput
    executor.num_kv_blocks, executor.num_swap_blocks    # KV blocks every rank holds
    executor.close()

MultiprocExecutor: the driver (rank 0, the user's process) broadcasts each step's
SchedulerOutput (fastllm.distributed.step_channel), then runs the same runner.execute as
every worker; its RunnerOutput is the step's. Any failure of a parallel step -- a worker
that died (its exit seen, or its connection closed), a step over FASTLLM_STEP_TIMEOUT, an
error in the driver's own half -- breaks lockstep for good: the executor is marked dead,
the workers it spawned are killed, and every later execute() raises WorkerFailedError.
The engine then fails every request in flight (LLMEngine.step).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
import weakref
from typing import Optional

import torch.multiprocessing as mp

from fastllm import envs
from fastllm.distributed import launch
from fastllm.distributed.worker import (BEGIN, EXECUTE, SHUTDOWN, Rank, WorkerSpec, build_rank,
                                        run_worker_loop, spawned_worker_main, teardown)
from fastllm.engine.step_data import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 10.0
_EXIT_GRACE_S = 1.0          # how long a failed step waits to see which worker died       # a worker told to shut down that is still alive then is killed


class WorkerFailedError(RuntimeError):
    """A rank of the parallel group died, hung or failed; the group is shut down."""


class Executor:
    """The interface LLMEngine uses (see the module docstring).

    Pipeline microbatches: with max_concurrent_batches > 1 the engine keeps that many
    steps in flight, each submit()ted, later collect()ed in the same order. Here (one
    stage) submit only queues the step and collect runs it: the same results, no overlap."""
    runner = None                # the driver's ModelRunner (tests and stats read it)
    num_kv_blocks: int
    num_swap_blocks: int
    max_concurrent_batches: int = 1

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        raise NotImplementedError

    def submit(self, sched: SchedulerOutput) -> None:
        self._submitted = getattr(self, "_submitted", collections.deque())
        self._submitted.append(sched)

    def collect(self, sched: SchedulerOutput) -> RunnerOutput:
        """The result of `sched`, the oldest step submitted and not collected."""
        if self._submitted.popleft() is not sched:
            raise ValueError("collect() must take the steps in the order they were submitted")
        return self.execute(sched)

    @property
    def is_alive(self) -> bool:
        return True

    @property
    def failure(self) -> Optional[str]:
        """Why the executor died (None while alive)."""
        return None

    def close(self) -> None:
        pass


class UniprocExecutor(Executor):
    """The runner in this process: behaviour and speed as a bare ModelRunner's."""

    def __init__(self, runner):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self.num_swap_blocks = runner.num_swap_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(sched)

    def close(self) -> None:
        self.runner.close()


class MultiprocExecutor(Executor):
    def __init__(self, rank: Rank, workers: "_SpawnedWorkers"):
        self.rank = rank
        self.runner = rank.runner
        self.num_kv_blocks = rank.num_kv_blocks
        self.num_swap_blocks = rank.num_swap_blocks
        self.workers = workers
        self._closed = False
        self._num_collected = 0     # microbatches collected (the workers finish as many)
        # Several steps in flight only pay with pipeline stages, and need a runner that
        # splits a step into begin (forward, send on) and finish (receive logits, sample).
        pp = rank.parallel.pp.world_size
        micro = envs.FASTLLM_PP_MICROBATCHES
        if micro == "auto":
            micro = "0" if self.runner.device.type == "cuda" else "1"
        if (pp > 1 and micro == "1"
                and hasattr(self.runner, "begin") and hasattr(self.runner, "finish")):
            self.max_concurrent_batches = pp
        # GC or interpreter exit without close(): the workers still go, and so does the
        # process group (another parallel LLM in this process needs a fresh one).
        self._finalizer = weakref.finalize(self, _abandon, workers)

    @classmethod
    def start(cls, spec: WorkerSpec) -> "MultiprocExecutor":
        """The driver's executor. On a torchrun rank other than 0 this process is a
        worker: it runs the worker loop until the driver shuts down, then raises
        SystemExit(0) (`LLM(...)` on such a rank never returns)."""
        world = spec.parallel_config.world_size
        if launch.torchrun_world_size() is not None:
            info = launch.torchrun_rank_info(world)
            if info.rank != 0:
                _run_torchrun_worker(spec, info)
            workers, store = _SpawnedWorkers([]), None
        else:
            port = launch.free_port()
            info = launch.spawned_rank_info(0, world, port)
            store = launch.host_store(port, world)
            workers = _SpawnedWorkers.spawn(spec, world, port)
        try:
            if store is not None:
                launch.wait_for_workers(store, world - 1, workers.check_alive)
            rank = build_rank(spec, info, store)
            workers.check_alive()
        except BaseException as e:
            workers.kill()
            teardown(None)
            failure = workers.failure()
            if failure is not None:
                raise WorkerFailedError(f"a worker failed while starting: {failure}") from e
            raise
        workers.start_monitor()
        return cls(rank, workers)

    @property
    def is_alive(self) -> bool:
        return not self._closed and self.workers.failure() is None

    @property
    def failure(self) -> Optional[str]:
        return self.workers.failure() or ("closed" if self._closed else None)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self._guarded(lambda: (self.rank.channel.send((EXECUTE, sched)),
                                      self.runner.execute(sched))[1])

    def submit(self, sched: SchedulerOutput) -> None:
        """Send the step to every rank and run this rank's stage of it (its forward pass,
        activations on to the next stage), without waiting for the logits."""
        self._guarded(lambda: (self.rank.channel.send((BEGIN, (sched, self._num_collected))),
                               self.runner.begin(sched)))

    def collect(self, sched: SchedulerOutput) -> RunnerOutput:
        """The oldest submitted step's logits from the last stage, sampled."""
        result = self._guarded(lambda: self.runner.finish(sched))
        self._num_collected += 1
        return result

    def _guarded(self, call):
        """Run one blocking part of a parallel step under the monitor's timeout. Whatever
        fails breaks lockstep for good: the group is shut down (leaving the process group
        closes the driver's connections, so torchrun's ranks see it and exit too)."""
        self._check_alive()
        self.workers.step_started()
        try:
            result = call()
            self._check_alive()       # a step the monitor timed out meanwhile is void
            return result
        except BaseException as e:
            self.workers.fail_after_step_error(e)
            teardown(None)
            self._check_alive(cause=e)
            raise
        finally:
            self.workers.step_finished()

    def _check_alive(self, cause: Optional[BaseException] = None) -> None:
        if self._closed:
            raise WorkerFailedError("the parallel executor is closed")
        failure = self.workers.failure()
        if failure is not None:
            raise WorkerFailedError(f"the parallel group is shut down: {failure}") from cause

    def close(self) -> None:
        """Tell the workers to exit, wait for them (killing stragglers), leave the process
        group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.workers.failure() is None:
            try:
                self.rank.channel.send((SHUTDOWN, None))
                self.rank.channel.flush(_JOIN_TIMEOUT_S)    # before the group goes away
            except Exception as e:  # noqa: BLE001 -- a worker died meanwhile: kill below
                logger.warning("shutdown message not delivered: %r", e)
        self.workers.join_or_kill()
        teardown(self.rank)
        self._finalizer.detach()


def _abandon(workers: "_SpawnedWorkers") -> None:
    workers.kill()
    teardown(None)


def _run_torchrun_worker(spec: WorkerSpec, info: launch.RankInfo) -> None:
    rank = build_rank(spec, info)
    try:
        run_worker_loop(rank)
    finally:
        teardown(rank)
    raise SystemExit(0)


class _SpawnedWorkers:
    """The driver's child processes and the watch over them: a thread that notices a
    worker's exit (its sentinel) or a step running past FASTLLM_STEP_TIMEOUT, records the
    failure and kills every worker, which also unblocks a driver waiting in a collective
    (gloo raises 'connection closed' at once). Shared by the executor, its monitor thread
    and its finalizer; holds no reference to the executor."""

    def __init__(self, procs: list, conns: Optional[list] = None):
        self.procs = procs                 # rank r is procs[r - 1]
        self.conns = conns or []
        self._failure: Optional[str] = None
        self._lock = threading.Lock()
        self._step_start: Optional[float] = None
        self._stop = threading.Event()
        self.timeout_s = envs.FASTLLM_STEP_TIMEOUT

    @classmethod
    def spawn(cls, spec: WorkerSpec, world: int, port: int) -> "_SpawnedWorkers":
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for r in range(1, world):
            parent_end, child_end = ctx.Pipe(duplex=False)
            info = launch.spawned_rank_info(r, world, port)
            p = ctx.Process(target=spawned_worker_main, name=f"fastllm-worker-{r}",
                            args=(spec, info, os.getpid(), child_end), daemon=True)
            p.start()
            child_end.close()
            procs.append(p)
            conns.append(parent_end)
        return cls(procs, conns)

    # -- state -----------------------------------------------------------------------
    def failure(self) -> Optional[str]:
        return self._failure

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = reason
                logger.error("parallel group failed: %s; shutting it down", reason)
        self.kill()

    def fail_after_step_error(self, error: BaseException) -> None:
        """The driver's step raised: a worker that died is the usual cause (gloo reports
        its closed connection), so name it when one exits within a moment."""
        deadline = time.monotonic() + _EXIT_GRACE_S
        while self.procs and time.monotonic() < deadline:
            if any(p.exitcode is not None for p in self.procs):
                self.check_alive_quietly()
                return
            time.sleep(0.02)
        self.fail(f"the parallel step failed on the driver: {error!r}")

    def check_alive(self) -> None:
        """Raise WorkerFailedError if a worker has exited (or the group failed)."""
        for r, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                self.fail(self._describe_exit(r, p))
        if self._failure is not None:
            raise WorkerFailedError(self._failure)

    def _describe_exit(self, r: int, p) -> str:
        code = p.exitcode
        how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        text = f"worker rank {r} (pid {p.pid}) {how}"
        conn = self.conns[r - 1] if r - 1 < len(self.conns) else None
        try:
            if conn is not None and conn.poll():
                message = conn.recv()
                if message:
                    text += f"; its error:\n{message}"
        except (EOFError, OSError):
            pass
        return text

    def step_started(self) -> None:
        self._step_start = time.monotonic()

    def step_finished(self) -> None:
        self._step_start = None

    # -- the monitor thread ----------------------------------------------------------
    def start_monitor(self) -> None:
        if self.procs:
            threading.Thread(target=self._watch, name="fastllm-worker-monitor", daemon=True).start()

    def _watch(self) -> None:
        poll_s = min(1.0, self.timeout_s / 10)
        while not self._stop.is_set() and self._failure is None:
            live = [p.sentinel for p in self.procs if p.exitcode is None]
            ready = multiprocessing.connection.wait(live, timeout=poll_s) if live else []
            if self._stop.is_set():
                return
            if ready or len(live) < len(self.procs):
                self.check_alive_quietly()
            start = self._step_start
            if start is not None and time.monotonic() - start > self.timeout_s:
                self.fail(f"a parallel step ran past FASTLLM_STEP_TIMEOUT={self.timeout_s:g} s "
                          f"(a worker hung)")

    def check_alive_quietly(self) -> None:
        try:
            self.check_alive()
        except WorkerFailedError:
            pass

    # -- shutdown --------------------------------------------------------------------
    def join_or_kill(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        self._stop.set()
        for p in self.procs:
            if p.exitcode is None:
                try:
                    p.kill()
                except (OSError, ValueError):
                    pass
        for p in self.procs:
            try:
                p.join(5.0)
            except (AssertionError, ValueError):   # not started, or already closed
                pass
