"""Which ranks this process talks to: its tensor-parallel and pipeline-parallel groups.

Ranks of one replica (world = tp * pp, fastllm.config.ParallelConfig):

    rank = pp_rank * tp + tp_rank        TP groups: consecutive ranks (one node's GPUs);
                                         PP groups: ranks tp apart (one per TP position)

Rank 0 is the driver: it schedules, samples, and serves HTTP; the others only compute.
The model, loader and runner receive a ParallelContext and never read torch.distributed
themselves, so a single-device engine is ParallelContext.single(device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastllm.config import ParallelConfig
from fastllm.distributed.communicator import (Communicator, SingleRankCommunicator,
                                              new_communicator)


@dataclass
class ParallelContext:
    tp: Communicator       # this rank's TP group: shards of each layer (rank = tp_rank)
    pp: Communicator       # this rank's PP group: the pipeline stages (rank = stage)
    rank: int = 0          # in the replica's world
    world_size: int = 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelContext":
        return cls(tp=SingleRankCommunicator(device), pp=SingleRankCommunicator(device))

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.world_size - 1


def tp_group_ranks(config: ParallelConfig) -> list[list[int]]:
    tp = config.tensor_parallel_size
    return [[p * tp + t for t in range(tp)] for p in range(config.pipeline_parallel_size)]


def pp_group_ranks(config: ParallelConfig) -> list[list[int]]:
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    return [[p * tp + t for p in range(pp)] for t in range(tp)]


def init_parallel_context(config: ParallelConfig, device: torch.device | str) -> ParallelContext:
    """Build this rank's groups; torch.distributed must be initialised over config.world_size
    ranks. Collective: every rank calls it, creating every group in the same order."""
    device = torch.device(device)
    if config.world_size == 1:
        return ParallelContext.single(device)
    rank = dist.get_rank()
    tp = _my_communicator(tp_group_ranks(config), rank, device)
    pp = _my_communicator(pp_group_ranks(config), rank, device)
    return ParallelContext(tp=tp, pp=pp, rank=rank, world_size=config.world_size)


def _my_communicator(groups: list[list[int]], rank: int, device: torch.device) -> Communicator:
    mine: Communicator = SingleRankCommunicator(device)
    for ranks in groups:
        if len(ranks) == 1:
            continue
        group = dist.new_group(ranks, backend="gloo")     # every rank creates every group
        if rank in ranks:
            mine = new_communicator(ranks, device, group)
    return mine
