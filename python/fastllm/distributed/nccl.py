"""NcclCommunicator: the Communicator on CUDA tensors, through fastllm._C's NCCL wrapper
(cpp/src/nccl_communicator.cc; libnccl is opened when the first communicator is made).

Set-up: rank 0 of the group makes the ncclUniqueId and publishes it in the torch.distributed
store (the one init_process_group made: TCP under torchrun, a file or TCP store under
torch.multiprocessing) under a key of this group; the other ranks wait for it there; every
rank then joins ncclCommInitRank. The ops enqueue on the current CUDA stream and never
synchronise, so a decode step that calls them can be captured in a CUDA graph.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from fastllm import ops
from fastllm.distributed.communicator import Communicator

# How many NCCL communicators this process made per group key: every rank builds its
# communicators in the same order (init_parallel_context is collective), so the count
# names the same communicator on every rank, and a rebuilt one never reads a stale id.
_made: collections.Counter = collections.Counter()


def _store_key(ranks: Sequence[int], group: Optional[dist.ProcessGroup]) -> str:
    name = getattr(group, "group_name", None) if group is not None else None
    base = f"fastllm/nccl/{name or 'ranks-' + '-'.join(map(str, ranks))}"
    _made[base] += 1
    return f"{base}/{_made[base]}"


def exchange_unique_id(store, key: str, is_root: bool, make_id: Callable[[], bytes]) -> bytes:
    """The root makes the id and sets it under `key`; the others block in store.get until it
    is there (the store's timeout bounds the wait)."""
    if is_root:
        uid = make_id()
        store.set(key, uid)
        return uid
    return bytes(store.get(key))


def _default_store():
    if not dist.is_initialized():
        raise RuntimeError("NcclCommunicator over several ranks needs torch.distributed initialised "
                           "(its store carries NCCL's unique id)")
    return dist.distributed_c10d._get_default_store()   # no public accessor for it


class NcclCommunicator(Communicator):
    """NCCL over the global ranks `ranks` (this process among them) on the CUDA `device`.
    `group`: the gloo group over `ranks` (only its name is used, for the store key)."""

    def __init__(self, ranks: Sequence[int], device: torch.device | str,
                 group: Optional[dist.ProcessGroup] = None, store=None):
        self.ranks = list(ranks)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device: NcclCommunicator needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        me = dist.get_rank() if dist.is_initialized() else 0
        if me not in self.ranks:
            raise ValueError(f"ranks: this process (rank {me}) is not in {self.ranks}")
        self.rank = self.ranks.index(me)
        self.world_size = len(self.ranks)
        if self.world_size == 1:
            uid = ops.nccl_unique_id()
        else:
            uid = exchange_unique_id(store or _default_store(), _store_key(self.ranks, group),
                                     self.rank == 0, ops.nccl_unique_id)
        self._comm = ops.nccl_comm_init(uid, self.world_size, self.rank, self.device)
        # One tiny all_reduce now: NCCL sets up its collective connections on first use,
        # which must not happen inside a CUDA graph capture. (Point-to-point connections
        # are made on the first send/recv with each peer: run one before capturing those.)
        self.all_reduce(torch.zeros(1, device=self.device))
        torch.cuda.synchronize(self.device)

    @property
    def nccl_version(self) -> int:
        return ops.nccl_library().version

    def all_reduce(self, x):
        if x.is_contiguous():
            ops.nccl_all_reduce(self._comm, x)
        else:                      # NCCL reads flat buffers: reduce a copy, write it back
            x.copy_(self.all_reduce(x.contiguous()))
        return x

    def all_gather(self, x, dim=-1):
        d = dim + x.dim() if dim < 0 else dim
        if not 0 <= d < x.dim():
            raise ValueError(f"dim: {dim} is out of range for a {x.dim()}-d tensor")
        x = x.contiguous()
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        ops.nccl_all_gather(self._comm, out, x)     # out[r] = rank r's x
        shape = (*x.shape[:d], self.world_size * x.shape[d], *x.shape[d + 1:])
        # [world, ..., x_d, ...] -> [..., world, x_d, ...] -> merge: rank r's x at r * x_d.
        return out.reshape(shape) if d == 0 else out.movedim(0, d).reshape(shape)

    def broadcast(self, x, src=0):
        if x.is_contiguous():
            ops.nccl_broadcast(self._comm, x, src)
        else:
            x.copy_(self.broadcast(x.contiguous(), src))
        return x

    def send(self, x, dst):
        ops.nccl_send(self._comm, x.contiguous(), dst)

    def recv(self, x, src):
        if x.is_contiguous():
            ops.nccl_recv(self._comm, x, src)
        else:
            x.copy_(self.recv(x.contiguous(), src))
        return x

    def close(self) -> None:
        """Clean shutdown (ncclCommDestroy); idempotent."""
        ops.nccl_close(self._comm)

    def abort(self) -> None:
        """When a peer died or hangs (ncclCommAbort does not wait for peers); idempotent."""
        ops.nccl_close(self._comm, abort=True)
