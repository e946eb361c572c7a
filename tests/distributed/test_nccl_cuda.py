"""NcclCommunicator on GPUs (libnccl of torch's CUDA wheels, or $FASTLLM_NCCL_SO): one GPU
runs every op eagerly and inside a CUDA graph replayed on new inputs; two GPUs (skipped
unless present) check the ops against values computed here from each rank's input."""
import pytest
import torch

from fastllm import ops

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")]
DTYPES = (torch.bfloat16, torch.float32)


def rank_input(rank: int, dtype, device, shape=(7, 5)):
    """Small integers (exact in bf16): distinct on every rank and element."""
    base = torch.arange(shape[0] * shape[1], device=device).reshape(shape) % 13 - 6
    return (base * (rank + 1) + 3 * rank).to(dtype)


def test_library_is_found_and_reports_a_version():
    lib = ops.nccl_library()
    assert lib.path in ops.nccl_library_candidates() and lib.version >= 20000


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_single_gpu_ops(dtype):
    from fastllm.distributed.nccl import NcclCommunicator
    comm = NcclCommunicator([0], "cuda:0")
    try:
        x = rank_input(0, dtype, "cuda")
        expected = x.clone()
        assert comm.all_reduce(x) is x and torch.equal(x, expected)
        for dim in (0, 1, -1):
            got = comm.all_gather(x, dim)
            assert torch.equal(got, expected) and got.data_ptr() != x.data_ptr()
        assert torch.equal(comm.broadcast(x, 0), expected)
        strided = rank_input(0, dtype, "cuda", (5, 7)).t()    # not contiguous: reduced through a copy
        assert torch.equal(comm.all_reduce(strided), rank_input(0, dtype, "cuda", (5, 7)).t())
        torch.cuda.synchronize()
    finally:
        comm.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_single_gpu_ops_in_a_cuda_graph(dtype):
    from fastllm.distributed.nccl import NcclCommunicator
    comm = NcclCommunicator([0], "cuda:0")
    try:
        x = rank_input(0, dtype, "cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):             # warm-up off the capture, as torch asks
            y = comm.all_reduce(x * 2)
            g = comm.all_gather(y + 1, -1)
            comm.broadcast(g, 0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = comm.all_reduce(x * 2)
            g = comm.broadcast(comm.all_gather(y + 1, -1), 0)
        for step in range(3):                     # new inputs each replay: the graph's ops run
            x.copy_(rank_input(step + 1, dtype, "cuda"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(g, x * 2 + 1), step
    finally:
        comm.close()


def _two_gpu_ops(rank, world_size):
    import torch.distributed as dist
    from fastllm.distributed.communicator import new_communicator
    from fastllm.distributed.nccl import NcclCommunicator
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    comm = new_communicator([0, 1], device, dist.new_group([0, 1]))
    assert isinstance(comm, NcclCommunicator) and comm.rank == rank
    out = {}
    for dtype in DTYPES:
        out[dtype, "all_reduce"] = comm.all_reduce(rank_input(rank, dtype, device)).cpu()
        for dim in (0, -1):
            out[dtype, "all_gather", dim] = comm.all_gather(rank_input(rank, dtype, device), dim).cpu()
        out[dtype, "broadcast"] = comm.broadcast(rank_input(rank, dtype, device), 1).cpu()
        got = torch.empty(7, 5, dtype=dtype, device=device)
        if rank == 0:
            comm.send(rank_input(rank, dtype, device), 1)
        else:
            comm.recv(got, 0)
        out[dtype, "recv"] = got.cpu()
        x = rank_input(rank, dtype, device)
        comm.all_reduce(x.clone())                # warm-up before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = comm.all_reduce(x * 2)
        x.copy_(rank_input(rank + 2, dtype, device))
        graph.replay()
        out[dtype, "graph"] = y.cpu()
    torch.cuda.synchronize()
    comm.close()
    return out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_hand_computed_values():
    from dist_helpers import run_ranks
    results = run_ranks(_two_gpu_ops, 2)
    for rank, out in enumerate(results):
        for dtype in DTYPES:
            inputs = [rank_input(r, dtype, "cpu") for r in range(2)]
            assert torch.equal(out[dtype, "all_reduce"], inputs[0] + inputs[1])
            for dim in (0, -1):
                assert torch.equal(out[dtype, "all_gather", dim], torch.cat(inputs, dim))
            assert torch.equal(out[dtype, "broadcast"], inputs[1])
            if rank == 1:
                assert torch.equal(out[dtype, "recv"], inputs[0])
            replayed = [rank_input(r + 2, dtype, "cpu") * 2 for r in range(2)]
            assert torch.equal(out[dtype, "graph"], replayed[0] + replayed[1])
