"""The NCCL wrapper on a machine without NCCL: loading errors name the paths tried; against a
stand-in libnccl (fake_nccl.c, compiled here) every NCCL error surfaces with
ncclGetErrorString's text and the op, each op hands NCCL the tensor's pointer, element count,
ncclDataType_t, ncclSum and the caller's stream, and the unique id travels through the
torch.distributed store. The stand-in sees host memory tagged as CUDA in the DLPack
capsule, so the C++ device checks run unchanged."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from dist_helpers import run_ranks
from fastllm import ops

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")
_C = ops._C
FAKE_SOURCE = os.path.join(os.path.dirname(__file__), "fake_nccl.c")
# ncclDataType_t of NCCL's nccl.h, for each dtype fastllm passes.
NCCL_DTYPES = {torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
               torch.bfloat16: 9}
STREAM = 0x3039


@pytest.fixture(scope="session")
def fake_nccl(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in libnccl")
    path = str(tmp_path_factory.mktemp("fake-nccl") / "libnccl-fake.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", path, FAKE_SOURCE], check=True, timeout=120)
    return path


@pytest.fixture
def use_fake(fake_nccl, monkeypatch):
    monkeypatch.setenv("FASTLLM_NCCL_SO", fake_nccl)
    monkeypatch.delenv("FAKE_NCCL_FAIL", raising=False)
    lib = ctypes.CDLL(fake_nccl)           # the same loaded copy the wrapper opened
    lib.fake_last_call.restype = ctypes.c_char_p
    return lib


def last_call(lib) -> dict:
    """The stand-in's record of its last call: {'op': name, field: int or str}."""
    text = lib.fake_last_call().decode()
    op, *fields = text.split(" ")
    out = {"op": op}
    for field in fields:
        key, value = field.split("=", 1)
        out[key] = 0 if value == "(nil)" else int(value, 16) if value.startswith("0x") else value
    return out


class _DLTensorHead(ctypes.Structure):   # DLTensor's first fields: data, device
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


def cuda_capsule(t: torch.Tensor, device_id: int = 0):
    """A DLPack capsule of the CPU tensor t that says kDLCUDA (2) on device_id."""
    capsule = to_dlpack(t)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    head = _DLTensorHead.from_address(get(capsule, b"dltensor"))
    head.device_type, head.device_id = 2, device_id
    return capsule


def fake_comm(world_size=1, rank=0):
    lib = ops.nccl_library()
    return _C.NcclCommunicator(lib, lib.unique_id(), world_size, rank, 0)


# -- loading -----------------------------------------------------------------------------------

def test_missing_library_names_the_path(monkeypatch, tmp_path):
    missing = str(tmp_path / "no" / "libnccl.so.2")
    monkeypatch.setenv("FASTLLM_NCCL_SO", missing)
    assert ops.nccl_library_candidates() == [missing]      # set: the only path tried
    with pytest.raises(RuntimeError, match="could not load NCCL") as err:
        ops.nccl_library()
    assert f"{missing}: " in str(err.value) and "No such file" in str(err.value)


def test_a_library_that_is_not_nccl_is_refused(monkeypatch):
    not_nccl = _C.__file__                 # a real shared object without NCCL's symbols
    monkeypatch.setenv("FASTLLM_NCCL_SO", not_nccl)
    with pytest.raises(RuntimeError, match=re.escape(f"{not_nccl}: does not export ncclGetVersion")):
        ops.nccl_library()


def test_default_candidates_are_torchs_wheel_then_the_loader_path(monkeypatch):
    monkeypatch.delenv("FASTLLM_NCCL_SO", raising=False)
    candidates = ops.nccl_library_candidates()
    site = os.path.dirname(os.path.dirname(os.path.realpath(torch.__file__)))
    assert candidates[0] == os.path.join(site, "nvidia", "nccl", "lib", "libnccl.so.2")
    assert candidates[-1] == "libnccl.so.2"
    try:
        lib = ops.nccl_library()
    except RuntimeError as e:              # no NCCL here: every candidate is named
        assert all(f"\n  {c}: " in str(e) for c in candidates)
    else:
        assert lib.path in candidates and lib.version >= 20000


def test_the_stand_in_loads(use_fake, fake_nccl):
    lib = ops.nccl_library()
    assert lib.path == fake_nccl and lib.version == 21903
    uid = lib.unique_id()
    assert len(uid) == 128 and uid.startswith(f"fake-nccl-id pid {os.getpid()} call".encode())


# -- errors carry ncclGetErrorString's text and the op -------------------------------------------

@pytest.mark.parametrize("fail, call, op", [
    ("init", lambda: fake_comm(), "ncclCommInitRank"),
    ("unique_id", lambda: ops.nccl_unique_id(), "ncclGetUniqueId"),
    ("version", lambda: ops.nccl_library().version, "ncclGetVersion"),
    ("all_reduce", lambda: fake_comm().all_reduce(cuda_capsule(torch.ones(3)), STREAM), "all_reduce (ncclAllReduce)"),
    ("all_gather", lambda: fake_comm().all_gather(cuda_capsule(torch.ones(3)), cuda_capsule(torch.ones(3)), STREAM),
     "all_gather (ncclAllGather)"),
    ("broadcast", lambda: fake_comm().broadcast(cuda_capsule(torch.ones(3)), 0, STREAM), "broadcast (ncclBroadcast)"),
    ("send", lambda: fake_comm(2).send(cuda_capsule(torch.ones(3)), 1, STREAM), "send (ncclSend)"),
    ("recv", lambda: fake_comm(2).recv(cuda_capsule(torch.ones(3)), 1, STREAM), "recv (ncclRecv)"),
    ("destroy", lambda: fake_comm().destroy(), "ncclCommDestroy"),
])
def test_every_nccl_error_raises_its_text(use_fake, monkeypatch, fail, call, op):
    monkeypatch.setenv("FAKE_NCCL_FAIL", fail)
    with pytest.raises(RuntimeError) as err:
        call()
    assert str(err.value) == (f"NCCL {op} failed: invalid usage (fake) (ncclResult_t 5): "
                              "fake detail: the op asked to fail")


# -- what each op hands NCCL ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(NCCL_DTYPES), ids=str)
def test_all_reduce_passes_pointer_count_dtype_sum_and_stream(use_fake, dtype):
    comm = fake_comm()
    x = torch.arange(3 * 7).reshape(3, 7).to(dtype)      # odd numel: 21
    comm.all_reduce(cuda_capsule(x), STREAM)
    assert last_call(use_fake) == {"op": "all_reduce", "send": x.data_ptr(), "recv": x.data_ptr(), "count": "21",
                                   "dtype": str(NCCL_DTYPES[dtype]), "arg": "0", "stream": STREAM}


def test_all_gather_broadcast_send_recv_arguments(use_fake):
    comm = fake_comm(world_size=1)
    x = torch.randn(5, 3, dtype=torch.bfloat16)
    out = torch.zeros(15, dtype=torch.bfloat16)
    comm.all_gather(cuda_capsule(out), cuda_capsule(x), STREAM)
    assert last_call(use_fake) == {"op": "all_gather", "send": x.data_ptr(), "recv": out.data_ptr(), "count": "15",
                                   "dtype": "9", "arg": "0", "stream": STREAM}
    assert torch.equal(out, x.flatten())                 # the stand-in's one-rank gather: a copy
    comm.broadcast(cuda_capsule(x), 0, 0)
    assert last_call(use_fake)["op"] == "broadcast" and last_call(use_fake)["stream"] == 0
    pair = fake_comm(world_size=2, rank=1)
    y = torch.zeros(9, dtype=torch.int64)
    pair.send(cuda_capsule(y), 0, STREAM)
    assert last_call(use_fake) == {"op": "send", "send": y.data_ptr(), "recv": 0, "count": "9", "dtype": "4",
                                   "arg": "0", "stream": STREAM}
    pair.recv(cuda_capsule(y), 0, STREAM)
    assert last_call(use_fake)["op"] == "recv" and last_call(use_fake)["recv"] == y.data_ptr()


def test_bad_arguments_are_refused_before_nccl(use_fake):
    comm = fake_comm(world_size=2)
    x = torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"all_reduce: x must be a CUDA tensor on cuda:0"):
        comm.all_reduce(to_dlpack(x), STREAM)                 # a CPU tensor
    with pytest.raises(ValueError, match="on cuda:0"):
        comm.all_reduce(cuda_capsule(x, device_id=1), STREAM)   # another GPU
    with pytest.raises(ValueError, match="x must be contiguous"):
        comm.all_reduce(cuda_capsule(x.t()), STREAM)
    with pytest.raises(ValueError, match=r"out must hold world_size \* x.numel\(\) = 48 elements, got 24"):
        comm.all_gather(cuda_capsule(torch.ones(24)), cuda_capsule(x), STREAM)
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        comm.all_gather(cuda_capsule(torch.ones(48, dtype=torch.float16)), cuda_capsule(x), STREAM)
    with pytest.raises(ValueError, match=r"broadcast: src must be in \[0, 2\), got 2"):
        comm.broadcast(cuda_capsule(x), 2, STREAM)
    with pytest.raises(ValueError, match=r"send: dst must be in \[0, 2\), got -1"):
        comm.send(cuda_capsule(x), -1, STREAM)
    lib = ops.nccl_library()
    with pytest.raises(ValueError, match="unique_id: expected 128 bytes, got 5"):
        _C.NcclCommunicator(lib, b"short", 2, 0, 0)
    with pytest.raises(ValueError, match=r"rank: must be in \[0, 2\), got 2"):
        _C.NcclCommunicator(lib, lib.unique_id(), 2, 2, 0)


def test_closed_communicator(use_fake):
    comm = fake_comm()
    comm.destroy()
    assert last_call(use_fake)["op"] == "destroy"
    comm.destroy()                                            # idempotent: NCCL not called again
    comm.abort()
    assert last_call(use_fake)["op"] == "destroy"
    with pytest.raises(RuntimeError, match="NCCL all_reduce: the communicator is closed"):
        comm.all_reduce(cuda_capsule(torch.ones(2)), STREAM)
    other = fake_comm()
    del other                                                 # never closed: aborted, never leaked
    assert last_call(use_fake)["op"] == "abort"


# -- the unique id through the torch.distributed store --------------------------------------------

def _exchange(rank, world_size, fake_path):
    import torch.distributed as dist
    from fastllm.distributed import nccl
    os.environ["FASTLLM_NCCL_SO"] = fake_path
    store = dist.distributed_c10d._get_default_store()
    group = dist.new_group([0, 1, 2])
    first = nccl.exchange_unique_id(store, nccl._store_key([0, 1, 2], group), rank == 0, ops.nccl_unique_id)
    again = nccl.exchange_unique_id(store, nccl._store_key([0, 1, 2], group), rank == 0, ops.nccl_unique_id)
    return first, again, os.getpid()


def test_unique_id_is_rank_zeros_on_every_rank(fake_nccl):
    results = run_ranks(_exchange, 3, fake_nccl)
    root_pid = results[0][2]
    for first, again, _ in results:
        # Rank 0's ids (its pid in the stand-in's id), the second under a fresh key, not the first's.
        assert first.startswith(f"fake-nccl-id pid {root_pid} call 1\0".encode()) and len(first) == 128
        assert again.startswith(f"fake-nccl-id pid {root_pid} call 2\0".encode())


# -- NcclCommunicator's own tensor handling, with NCCL's calls emulated for 3 ranks ---------------

def test_all_gather_layout_and_strided_inputs(monkeypatch):
    """NCCL gathers flat buffers rank after rank; NcclCommunicator must turn that into
    torch.cat along `dim`, and run strided tensors through contiguous copies."""
    from fastllm.distributed.nccl import NcclCommunicator
    world = 3
    piece = [lambda x, r=r: x * 10 + r for r in range(world)]          # what rank r would hold

    def nccl_all_gather(comm, out, x):     # ncclAllGather: out = [rank 0's x | rank 1's | rank 2's]
        assert x.is_contiguous() and out.is_contiguous() and out.numel() == world * x.numel()
        out.view(world, -1).copy_(torch.stack([piece[r](x).flatten() for r in range(world)]))

    def nccl_all_reduce(comm, x):          # ncclAllReduce in place: sum of the 3 ranks' pieces
        assert x.is_contiguous()
        x.copy_(sum(piece[r](x) for r in range(world)))

    monkeypatch.setattr(ops, "nccl_all_gather", nccl_all_gather)
    monkeypatch.setattr(ops, "nccl_all_reduce", nccl_all_reduce)
    comm = NcclCommunicator.__new__(NcclCommunicator)    # no NCCL here: only the Python layer
    comm._comm, comm.world_size, comm.rank = None, world, 0
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    for dim in (0, 1, 2, -1, -2):
        assert torch.equal(comm.all_gather(x, dim), torch.cat([piece[r](x) for r in range(world)], dim))
    strided = x.transpose(0, 2)                          # [5, 3, 2], not contiguous
    assert torch.equal(comm.all_gather(strided, 1), torch.cat([piece[r](strided) for r in range(world)], 1))
    with pytest.raises(ValueError, match="dim: 3 is out of range for a 3-d tensor"):
        comm.all_gather(x, 3)
    y = x.clone().transpose(0, 2)
    expected = 30 * y + 3
    assert comm.all_reduce(y) is y and torch.equal(y, expected)   # written back into the strided view
