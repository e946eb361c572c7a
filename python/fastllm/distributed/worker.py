"""One rank of a parallel replica: its model and runner, and the loop non-driver ranks run.

    rank = build_rank(spec, info)        # every rank, the driver included (collective)
    run_worker_loop(rank)                # ranks 1..world-1: execute what the driver sends

Every rank builds the same runner from the same WorkerSpec; in lockstep they execute the
same SchedulerOutput each step (the driver's broadcast, fastllm.distributed.step_channel),
so each rank's KV cache and request state follow the driver's scheduler exactly. Only the
driver's RunnerOutput is used (with tensor parallelism only the driver samples).
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastllm.config import EngineConfig, ParallelConfig
from fastllm.distributed import launch
from fastllm.distributed.parallel_state import ParallelContext, init_parallel_context
from fastllm.distributed.step_channel import StepChannel, min_over_ranks, new_step_group

logger = logging.getLogger(__name__)

# The driver's message kinds: EXECUTE sched (a whole step); BEGIN (sched, collected) (a
# pipeline microbatch: begin it, once the driver's `collected` first steps are finished
# here too); SHUTDOWN.
EXECUTE, BEGIN, SHUTDOWN = "execute", "begin", "shutdown"


@dataclass
class WorkerSpec:
    """What every rank needs to build the same engine half (pickled to spawned workers)."""
    model: str
    dtype: str | torch.dtype
    device: str
    quantization: Optional[str]
    engine_config: EngineConfig
    parallel_config: ParallelConfig
    valid_vocab_size: Optional[int]      # the ids the tokenizer knows (the runner's sampler)


@dataclass
class Rank:
    """A built rank: its runner and the channel the driver's steps arrive on."""
    info: launch.RankInfo
    parallel: ParallelContext
    runner: object                       # fastllm.engine.model_runner.ModelRunner
    channel: StepChannel
    model_config: object
    device: torch.device
    dtype: torch.dtype
    num_kv_blocks: int                   # the minimum over the replica's ranks
    num_swap_blocks: int
    threads_before: Optional[int] = None # torch's CPU threads before the split (restored)


def build_rank(spec: WorkerSpec, info: launch.RankInfo, store=None) -> Rank:
    """Join the replica and build this rank's runner. Collective, in this order on every
    rank: process group, TP/PP groups, step group, KV block agreement."""
    from fastllm.engine.model_runner import ModelRunner
    from fastllm.model.loader import load_for_engine
    device = launch.rank_device(spec.device, info)
    threads_before = None
    if device.type == "cpu":
        threads_before = launch.split_cpu_threads(info)
    else:
        torch.cuda.set_device(device)
    launch.init_distributed(info, store)
    parallel = init_parallel_context(spec.parallel_config, device)
    channel = StepChannel(new_step_group(info.world_size))
    loaded = load_for_engine(spec.model, dtype=spec.dtype, device=device,
                             quantization=spec.quantization, parallel=parallel)
    spec.engine_config.resolve_max_model_len(loaded.config)
    runner = ModelRunner(loaded.model, loaded.config, spec.engine_config, device=loaded.device,
                         dtype=loaded.dtype, valid_vocab_size=spec.valid_vocab_size,
                         parallel=parallel)
    # Each rank sized its own KV cache (free memory differs by rank); the scheduler hands
    # out only block ids that every rank holds. On the step group: no step timeout while
    # a slower rank is still loading its weights.
    num_kv, num_swap = min_over_ranks([runner.num_kv_blocks, runner.num_swap_blocks],
                                      group=channel.group)
    return Rank(info, parallel, runner, channel, loaded.config, loaded.device, loaded.dtype,
                num_kv, num_swap, threads_before)


def run_worker_loop(rank: Rank) -> None:
    """Execute the driver's steps until it says shutdown (returns) or its connection
    breaks (raises: the driver died). The driver's result is the one used; here a
    step's finish only completes its sends (activations on, logits to the driver).

    Microbatches: a step begins when its message arrives, and finishes once the driver
    says it has collected it, never sooner -- finishing waits for the step's sends, and
    a worker blocked there while the driver broadcasts the next step would deadlock."""
    runner = rank.runner
    begun: collections.deque = collections.deque()
    num_finished = 0
    while True:
        kind, payload = rank.channel.recv()
        if kind == EXECUTE:
            runner.execute(payload)
            continue
        if kind == SHUTDOWN:
            while begun:
                runner.finish(begun.popleft())
            return
        sched, collected = payload
        while num_finished < collected:
            runner.finish(begun.popleft())
            num_finished += 1
        runner.begin(sched)
        begun.append(sched)


def teardown(rank: Optional[Rank]) -> None:
    if rank is not None:
        rank.runner.close()
        if rank.threads_before is not None:
            torch.set_num_threads(rank.threads_before)
    if dist.is_initialized():
        dist.destroy_process_group()


def spawned_worker_main(spec: WorkerSpec, info: launch.RankInfo, parent_pid: int, conn) -> None:
    """Entry point of a spawned worker (torch.multiprocessing 'spawn'). `conn` (a Pipe end)
    carries one message back: None once built, or the traceback of what failed, which
    the driver puts in its error."""
    launch.die_with_parent(parent_pid)
    rank = None
    try:
        port = int(info.init_method.rsplit(":", 1)[1])
        rank = build_rank(spec, info, launch.join_store(port, info.world_size))
        conn.send(None)
        run_worker_loop(rank)
    except BaseException:                 # noqa: BLE001 -- reported to the driver, then exit 1
        text = traceback.format_exc()
        logger.error("worker rank %d failed:\n%s", info.rank, text)
        try:
            conn.send(text)
        except OSError:
            pass
        os._exit(1)                       # no teardown: the group is broken anyway
    teardown(rank)
    # Skip the interpreter's exit (seconds of torch and gloo finalizers): nothing is left
    # to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
