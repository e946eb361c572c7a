"""Communicator: the one interface every parallel code path talks through.

Two backends with the same methods, so tensor and pipeline parallel code is identical on
GPUs and on the CPU (which is how CI tests it):

    GlooCommunicator   torch.distributed with the gloo backend, CPU tensors
    NcclCommunicator   fastllm._C's NCCL wrapper (fastllm.distributed.nccl), CUDA tensors,
                       on the current stream, usable inside CUDA graph capture

Collectives work in place where they can, and return the tensor that holds the result:

    all_reduce(x)             x <- sum over ranks of x                       (returns x)
    all_gather(x, dim)        concatenation of every rank's x along dim      (new tensor)
    broadcast(x, src)         x <- src's x                                   (returns x)
    send(x, dst) / recv(x, src)   point to point (pipeline stages), recv fills x
    isend(x, dst) -> handle       send without waiting for the peer's recv (handle.wait())

A communicator covers one group of ranks (a TP group, a PP group); `rank` and
`world_size` are within that group. Built with `new_communicator(ranks, device)` after
`torch.distributed` is initialised (its store also carries NCCL's unique id).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class Communicator:
    """The interface; see the module docstring. world_size 1 makes every op the identity."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def send(self, x: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        raise NotImplementedError

    def isend(self, x: torch.Tensor, dst: int):
        """send without waiting for the receiver; returns a handle whose wait() returns
        once x may be reused. Pipeline stages need it: gloo's send blocks until the peer
        posts its recv, so two stages sending to each other (activations one way, logits
        the other, microbatches in flight) would wait forever. Default: send() (right
        for a backend whose send only queues the transfer, as NCCL's on its stream)."""
        self.send(x, dst)
        return _SentHandle()

    def close(self) -> None:
        pass


class _SentHandle:
    def wait(self) -> None:
        pass


class SingleRankCommunicator(Communicator):
    """world_size 1: what an unsharded model holds, so layers need no `if comm` branches."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x

    def broadcast(self, x, src=0):
        return x

    def send(self, x, dst):
        raise ValueError(f"send to rank {dst}: a single-rank communicator has no peer")

    def recv(self, x, src):
        raise ValueError(f"recv from rank {src}: a single-rank communicator has no peer")


class GlooCommunicator(Communicator):
    """torch.distributed gloo over the global ranks `ranks` (this process among them)."""

    def __init__(self, ranks: Sequence[int], group: Optional[dist.ProcessGroup] = None):
        self.ranks = list(ranks)
        self.group = group if group is not None else dist.new_group(self.ranks, backend="gloo")
        self.rank = self.ranks.index(dist.get_rank())
        self.world_size = len(self.ranks)
        self.device = torch.device("cpu")

    def all_reduce(self, x):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather(self, x, dim=-1):
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x, src=0):
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def send(self, x, dst):
        dist.send(x.contiguous(), dst=self.ranks[dst], group=self.group)

    def isend(self, x, dst):
        return dist.isend(x.contiguous(), dst=self.ranks[dst], group=self.group)

    def recv(self, x, src):
        dist.recv(x, src=self.ranks[src], group=self.group)
        return x


def new_communicator(ranks: Sequence[int], device: torch.device | str,
                     group: Optional[dist.ProcessGroup] = None) -> Communicator:
    """The communicator of this rank (a member of `ranks`) on `device`: one rank ->
    SingleRankCommunicator; CUDA -> NcclCommunicator (fastllm.distributed.nccl); CPU ->
    GlooCommunicator. `group`: the gloo group over `ranks`, which every rank of the world
    must create, members or not (torch.distributed.new_group's rule); see
    parallel_state.init_parallel_context."""
    device = torch.device(device)
    if len(ranks) == 1:
        return SingleRankCommunicator(device)
    if device.type == "cuda":
        from fastllm.distributed.nccl import NcclCommunicator   # the NCCL backend's module
        return NcclCommunicator(ranks, device, group)
    return GlooCommunicator(ranks, group)
