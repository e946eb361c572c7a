"""Page-locked host tensors of exactly the size asked for (the KV swap space).

torch's pinned allocator (pin_memory=True) rounds every request up to a power of two: a
20 GiB swap space would lock 32 GiB of RAM. Here the tensor is ordinary CPU memory that
cudaHostRegister then page-locks in place, byte for byte, so device copies to and from it
are asynchronous DMA; it is unregistered before the memory goes back (close(), or when
the owner is collected). Should registration fail, torch's pinned allocator is the
fallback (rounded up, but still pinned).

    buf = PinnedHostTensor((L, 2, n, *block_shape), torch.float16, device)
    buf.tensor          # the CPU tensor; buf.registered: pinned by cudaHostRegister
    buf.close()         # waits for the device, unregisters; idempotent
"""
from __future__ import annotations

import ctypes
import logging
import weakref

import torch

logger = logging.getLogger(__name__)

_REGISTER_DEFAULT = 0     # cudaHostRegisterDefault


# Module functions, not inline calls, so CPU tests can stand in for the CUDA runtime.
def _cudart():
    """torch's libcudart bindings."""
    return torch.cuda.cudart()


def _synchronize(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _device_context(device: torch.device):
    # cudaHostRegisterDefault pins for the current device's context: make it `device`'s.
    return torch.cuda.device(device)


def _pinned_by_torch(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _clear_cuda_error() -> None:
    """A failed CUDA runtime call leaves its error as the thread's last error, which torch's
    next kernel-launch check (cudaGetLastError) would raise as its own failure. Reset it in
    the libcudart torch loaded (best effort: nothing to do where none is found)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError):
        pass


def _unregister(ptr: int, device: torch.device) -> None:
    # In-flight copies may still read or write the pages: wait for them first.
    _synchronize(device)
    err = int(_cudart().cudaHostUnregister(ptr))
    if err != 0:
        _clear_cuda_error()
        logger.warning("cudaHostUnregister of the swap space failed (CUDA error %d)", err)


class PinnedHostTensor:
    """A CPU tensor, page-locked for `device` when it is a CUDA device (else plain memory)."""

    def __init__(self, shape: tuple, dtype: torch.dtype, device):
        self.device = torch.device(device)
        self.registered = False
        self._finalizer = None
        self.tensor = torch.empty(shape, dtype=dtype)
        nbytes = self.tensor.numel() * self.tensor.element_size()
        if self.device.type != "cuda" or nbytes == 0:
            return
        ptr = self.tensor.data_ptr()
        with _device_context(self.device):
            err = int(_cudart().cudaHostRegister(ptr, nbytes, _REGISTER_DEFAULT))
        if err == 0:
            self.registered = True
            # Unregister before the memory is freed, also when close() is never called:
            # the finalizer runs while self.tensor is still alive.
            self._finalizer = weakref.finalize(self, _unregister, ptr, self.device)
            return
        _clear_cuda_error()
        logger.warning("cudaHostRegister of %.2f GiB failed (CUDA error %d); pinning the swap "
                       "space with torch's allocator instead (rounded up to a power of two)",
                       nbytes / (1 << 30), err)
        self.tensor = None      # free the unregistered memory before taking the pinned one
        self.tensor = _pinned_by_torch(tuple(shape), dtype)

    @property
    def is_pinned(self) -> bool:
        return self.registered or (self.tensor is not None and self.tensor.is_pinned())

    def close(self) -> None:
        """Wait for the device, unpin, drop the tensor (views taken of it stay valid, as
        ordinary pageable memory). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()           # runs _unregister once, then detaches
            self._finalizer = None
        self.registered = False
        self.tensor = None
