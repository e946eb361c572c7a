"""Host -> device uploads through a reusable staging buffer, one buffer per use site.

A copy from ordinary (pageable) host memory makes the CPU wait until the device's stream
has drained, so the host work of a step could not overlap the kernels already queued.
A StagingBuffer is pinned on a GPU and copied with non_blocking=True; an event recorded
on the device's own stream after each copy marks when the buffer may be written again.
On the CPU there is nothing to overlap: each call gets a fresh buffer (the returned
tensors alias it) and upload() is the identity, so the same packing code runs on both.

    staging = StagingBuffer(device)
    dev = staging.pack({"rows": np.array([0, 2]), "temperature": np.array([0.7, 1.0], np.float32)})
    dev["rows"]          # int64 [2] on the device: a view of the one uploaded buffer
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from fastllm.utils import cdiv

# Every packed array starts at a multiple of this (the widest element: int64 / float64),
# so the device copy can be viewed as any dtype at its offset.
_ALIGN = 8


class StagingBuffer:
    def __init__(self, device):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._host: Optional[torch.Tensor] = None      # uint8, pinned; grows, never shrinks
        # Made once; re-recorded after every copy out of the buffer.
        self._copied = torch.cuda.Event() if self.pinned else None

    def host(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of nbytes, safe to write now."""
        if not self.pinned:
            return torch.empty(nbytes, dtype=torch.uint8)
        if self._host is None or self._host.numel() < nbytes:
            # A copy may still read the old buffer: torch's pinned allocator keeps its
            # memory until that copy is done, so dropping it here is safe.
            old = 0 if self._host is None else self._host.numel()
            self._host = torch.empty(max(nbytes, 2 * old, 4096), dtype=torch.uint8, pin_memory=True)
        else:
            self._copied.synchronize()        # the last copy out of it has finished
        return self._host[:nbytes]

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """The device copy of (a view of) the buffer host() returned."""
        if not self.pinned:
            return host
        dev = host.to(self.device, non_blocking=True)
        # On this device's stream (the copy's), not whatever device is current.
        self._copied.record(torch.cuda.current_stream(self.device))
        return dev

    def pack(self, arrays: dict) -> dict:
        """name -> numpy array in, name -> device tensor (same dtype and shape) out, all
        views of one host -> device copy."""
        offsets, total = {}, 0
        for name, a in arrays.items():
            offsets[name] = total
            total += cdiv(a.nbytes, _ALIGN) * _ALIGN
        host = self.host(max(total, _ALIGN))
        buf = host.numpy()
        for name, a in arrays.items():
            off = offsets[name]
            buf[off:off + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        dev = self.upload(host)
        return {name: dev[offsets[name]:offsets[name] + a.nbytes].view(_torch_dtype(a.dtype)).view(a.shape)
                for name, a in arrays.items()}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
