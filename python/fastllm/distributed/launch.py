"""Where this process's rank comes from, and the process-level setup of a rank.

Two ways to start a replica of world = tensor_parallel_size * pipeline_parallel_size ranks:

    spawned   LLM(..., tensor_parallel_size=2) in one process: that process is rank 0 (the
              driver) and spawns ranks 1..world-1 (torch.multiprocessing, 'spawn'); the
              rendezvous is a free loopback port.
    torchrun  every rank is started by torchrun (one node or many), which sets RANK,
              WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; the
              rendezvous is env://.

Either way torch.distributed runs gloo (the step broadcast is gloo on GPUs too; the model's
own collectives go through fastllm.distributed.communicator).
"""
from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastllm import envs

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1          # linux/prctl.h


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    init_method: str           # torch.distributed's init_method
    torchrun: bool             # ranks were started by torchrun (nothing to spawn)


def torchrun_world_size() -> Optional[int]:
    """WORLD_SIZE when this process was started by torchrun (or a launcher setting the
    same variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["WORLD_SIZE"])


def torchrun_rank_info(world_size: int) -> RankInfo:
    """This process's rank from torchrun's environment, checked against the world the
    engine was configured for."""
    env_world = torchrun_world_size()
    if env_world != world_size:
        raise ValueError(f"torchrun started WORLD_SIZE={env_world} ranks but "
                         f"tensor_parallel_size * pipeline_parallel_size = {world_size}; "
                         f"give --tensor-parallel-size / --pipeline-parallel-size whose product "
                         f"is the number of ranks (nnodes * nproc-per-node)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return RankInfo(rank, world_size, local_rank, local_world, "env://", torchrun=True)


def spawned_rank_info(rank: int, world_size: int, port: int) -> RankInfo:
    """Rank `rank` of a world this machine spawns; the rendezvous store is on `port`."""
    return RankInfo(rank, world_size, rank, world_size, f"tcp://127.0.0.1:{port}", torchrun=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_timeout() -> datetime.timedelta:
    """The collectives' timeout: FASTLLM_STEP_TIMEOUT plus a margin, so that where the
    driver watches its own children (spawned workers) its monitor names the hang first."""
    step = envs.FASTLLM_STEP_TIMEOUT
    return datetime.timedelta(seconds=step + min(5.0, 0.25 * step))


def init_distributed(info: RankInfo, store: Optional[dist.Store] = None) -> None:
    """Join the replica's torch.distributed world (gloo), through `store` when given
    (spawned ranks), else info.init_method. The timeout is the step timeout: a collective
    of the model (TP all_reduce, PP recv) that waits on a hung rank longer than that
    raises instead of hanging."""
    if store is not None:
        dist.init_process_group("gloo", store=store, rank=info.rank,
                                world_size=info.world_size, timeout=step_timeout())
    else:
        dist.init_process_group("gloo", init_method=info.init_method, rank=info.rank,
                                world_size=info.world_size, timeout=step_timeout())


_JOINED_KEY = "fastllm/joined"
_START_TIMEOUT_S = 300.0       # spawned workers' start (a Python + torch import each)


def host_store(port: int, world_size: int) -> dist.TCPStore:
    """The driver's rendezvous store for spawned workers; see wait_for_workers."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=_START_TIMEOUT_S))


def join_store(port: int, world_size: int) -> dist.TCPStore:
    """A spawned worker's connection to the driver's store; counts itself in."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=_START_TIMEOUT_S))
    store.add(_JOINED_KEY, 1)
    return store


def wait_for_workers(store: dist.TCPStore, num_workers: int, check_alive, poll_s: float = 0.05) -> None:
    """Block until `num_workers` spawned workers joined the store, calling check_alive()
    (which raises for a dead worker) meanwhile: a worker that dies while starting fails
    the start at once instead of after the rendezvous timeout."""
    limit = max(envs.FASTLLM_STEP_TIMEOUT, _START_TIMEOUT_S)
    deadline = time.monotonic() + limit
    while store.add(_JOINED_KEY, 0) < num_workers:
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers did not start within {limit:g} s")
        time.sleep(poll_s)


def rank_device(device: str, info: RankInfo) -> torch.device:
    """cuda:local_rank on GPUs (device 'auto' or 'cuda'), else the CPU."""
    from fastllm.model.loader import resolve_device
    kind = resolve_device(device).type
    return torch.device("cuda", info.local_rank) if kind == "cuda" else torch.device("cpu")


def split_cpu_threads(info: RankInfo) -> int:
    """The ranks of one machine share its cores: each gets an equal share of torch's
    intra-op threads (at least one), so N ranks do not oversubscribe N-fold. Returns the
    count before, for the driver to restore when its group closes."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, info.local_world_size)))
    return before


def die_with_parent(parent_pid: int) -> None:
    """A spawned worker dies when its parent (the driver's process) does, however the
    parent ends (SIGKILL included): Linux's PR_SET_PDEATHSIG; the parent-pid check closes
    the race where the parent died before the call."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def is_parallel_launch(parallel_config) -> bool:
    """More than one rank: asked for (tp * pp > 1), or this process is one of several
    torchrun started."""
    return parallel_config.world_size > 1 or (torchrun_world_size() or 1) > 1
