"""The driver's step messages to its workers: a pickled object broadcast over a gloo group.

    channel = StepChannel(group)       # every rank of the replica, same group
    channel.send(("execute", sched))   # the driver (rank 0)
    kind, payload = channel.recv()     # every other rank, in the same order

One broadcast of a fixed-size buffer per message ([8-byte length | payload head]); a
payload longer than the buffer (a large prefill's block tables) follows in a second
broadcast of exactly its remaining bytes. The driver does not wait for them: a gloo
broadcast returns only once every peer posted its receive, i.e. finished its part of the
previous step, and waiting would stop the driver's stage from working on the next
pipeline microbatch meanwhile. At most MAX_UNACKED messages are left unconfirmed. gloo works across nodes, so the same channel
serves spawned workers and torchrun ranks on other machines.

The group's timeout is effectively infinite: a worker waits here as long as the server
sits idle. Hangs are caught on the step's own collectives (see launch.init_distributed).
Pickle runs code on load: the channel, like torch.distributed itself, is for ranks of one
trusted job on a trusted network.
"""
from __future__ import annotations

import collections
import datetime
import pickle
from typing import Any, Optional

import torch
import torch.distributed as dist

_LEN_BYTES = 8
MAX_UNACKED = 8
_BUFFER_BYTES = 64 << 10
# No timeout in practice (gloo keeps it in milliseconds; ten years fits easily).
_IDLE_TIMEOUT = datetime.timedelta(days=3650)


def new_step_group(world_size: int) -> dist.ProcessGroup:
    """Collective: every rank of the replica calls it, once, in the same order."""
    return dist.new_group(list(range(world_size)), backend="gloo", timeout=_IDLE_TIMEOUT)


class StepChannel:
    def __init__(self, group: dist.ProcessGroup, src: int = 0):
        self.group = group
        self.src = src
        self._buffer = torch.empty(_BUFFER_BYTES, dtype=torch.uint8)
        self._unacked: collections.deque = collections.deque()   # (work, its buffer)

    def send(self, message: Any) -> None:
        """The driver's side. Returns before the peers received (see the module docstring);
        a broken peer's error surfaces at a later send or at flush()."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        head = min(len(data), _BUFFER_BYTES - _LEN_BYTES)
        buffer = torch.empty(_BUFFER_BYTES, dtype=torch.uint8)     # alive until sent
        view = buffer.numpy()
        view[:_LEN_BYTES] = memoryview(len(data).to_bytes(_LEN_BYTES, "little"))
        view[_LEN_BYTES:_LEN_BYTES + head] = memoryview(data)[:head]
        self._start(buffer)
        if head < len(data):
            self._start(torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8))

    def _start(self, tensor: torch.Tensor) -> None:
        while self._unacked and (self._unacked[0][0].is_completed()
                                 or len(self._unacked) >= MAX_UNACKED):
            self._unacked.popleft()[0].wait()          # raises a peer's failure
        work = dist.broadcast(tensor, src=self.src, group=self.group, async_op=True)
        self._unacked.append((work, tensor))

    def flush(self, timeout_s: float) -> None:
        """Wait until every message sent was received (raises after timeout_s)."""
        while self._unacked:
            self._unacked.popleft()[0].wait(datetime.timedelta(seconds=timeout_s))

    def recv(self) -> Any:
        dist.broadcast(self._buffer, src=self.src, group=self.group)
        view = self._buffer.numpy()
        size = int.from_bytes(view[:_LEN_BYTES].tobytes(), "little")
        head = min(size, _BUFFER_BYTES - _LEN_BYTES)
        data = view[_LEN_BYTES:_LEN_BYTES + head].tobytes()
        if head < size:
            rest = torch.empty(size - head, dtype=torch.uint8)
            dist.broadcast(rest, src=self.src, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


def min_over_ranks(values: list[int], group: Optional[dist.ProcessGroup] = None) -> list[int]:
    """Element-wise minimum of each rank's `values` (collective over `group`)."""
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return t.tolist()
