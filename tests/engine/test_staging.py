"""StagingBuffer: several host arrays -> device tensors of the same dtype, shape and
values, all views of one copy. On CPU the packing runs as on a GPU (only the pinning,
the non-blocking copy and the event are GPU-only)."""
import numpy as np
import pytest
import torch

from fastllm.engine.staging import StagingBuffer

ARRAYS = {
    "rows": np.array([0, 2, 5], dtype=np.int64),
    "temperature": np.array([0.7, 1.0, 1.3], dtype=np.float32),   # 12 bytes: next one realigns
    "is_greedy": np.array([True, False, True]),
    "empty": np.empty(0, dtype=np.int64),
    "table": np.arange(6, dtype=np.int32).reshape(2, 3),
    "top_k": np.array([0, 50, 3], dtype=np.int64),
}


def check(dev, device):
    assert set(dev) == set(ARRAYS)
    for name, a in ARRAYS.items():
        t = dev[name]
        assert t.device.type == torch.device(device).type
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert t.cpu().tolist() == a.tolist(), name
    assert len({t.untyped_storage().data_ptr() for t in dev.values()}) == 1


def test_pack_round_trips_every_dtype_in_one_buffer():
    staging = StagingBuffer("cpu")
    dev = staging.pack(ARRAYS)
    check(dev, "cpu")
    # A fresh buffer per call on the CPU: the first step's tensors are not overwritten.
    staging.pack({k: np.zeros_like(a) for k, a in ARRAYS.items()})
    check(dev, "cpu")


def test_pack_of_nothing_is_empty():
    assert StagingBuffer("cpu").pack({}) == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_pack_is_pinned_reused_and_ordered():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    staging = StagingBuffer(device)
    dev = staging.pack(ARRAYS)
    assert staging._host.is_pinned()
    first_buffer = staging._host.data_ptr()
    check(dev, device)
    again = staging.pack({k: np.zeros_like(a) for k, a in ARRAYS.items()})
    assert staging._host.data_ptr() == first_buffer       # reused once the copy is done
    check(dev, device)                                     # the first upload is intact
    assert all(not bool(t.any()) for t in again.values() if t.numel())
