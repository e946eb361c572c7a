"""The Communicator contract on CPU: gloo communicators of 3 and 2 ranks (the 2 not starting
at rank 0: group ranks are not global ranks) against values computed here from each rank's
input, the tp=2 x pp=2 groups of init_parallel_context, and the single-rank identity; one
spawn of 4 ranks runs them all."""
import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks
from fastllm.config import ParallelConfig
from fastllm.distributed.communicator import GlooCommunicator, SingleRankCommunicator, new_communicator
from fastllm.distributed.parallel_state import init_parallel_context

SHAPE = (7, 5)   # odd sizes on both dims
DTYPES = (torch.float32, torch.int64)


def rank_input(rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Distinct on every rank and element: base * (rank + 1) + 100 * rank."""
    base = torch.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) - 11
    return (base * (rank + 1) + 100 * rank).to(dtype)


GROUPS = {3: [0, 1, 2], 2: [1, 3]}   # communicators of 3 and 2 ranks in a world of 4


def _gloo_ops(rank, ranks):
    group = dist.new_group(ranks)          # every rank creates every group, members or not
    if rank not in ranks:
        return None
    comm = new_communicator(ranks, "cpu", group)
    n, me = len(ranks), ranks.index(rank)
    assert isinstance(comm, GlooCommunicator) and (comm.rank, comm.world_size) == (me, n)
    out = {}
    for dtype in DTYPES:
        x = rank_input(me, dtype)
        out[dtype, "all_reduce_in_place"] = comm.all_reduce(x) is x
        out[dtype, "all_reduce"] = x
        for dim in (0, 1, -1):
            out[dtype, "all_gather", dim] = comm.all_gather(rank_input(me, dtype), dim)
        out[dtype, "broadcast"] = comm.broadcast(rank_input(me, dtype), src=n - 1)
        # A chain around the ring (group rank 0 sends first): blocking sends never deadlock.
        got = torch.empty(SHAPE, dtype=dtype)
        if me == 0:
            comm.send(rank_input(me, dtype), (me + 1) % n)
            comm.recv(got, (me - 1) % n)
        else:
            comm.recv(got, (me - 1) % n)
            comm.send(rank_input(me, dtype), (me + 1) % n)
        out[dtype, "recv"] = got
    return out


def _tp2_pp2(rank):
    ctx = init_parallel_context(ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2), "cpu")
    me = torch.tensor([float(rank)])
    return {"rank": ctx.rank, "world_size": ctx.world_size, "tp_ranks": ctx.tp.ranks, "tp_rank": ctx.tp.rank,
            "pp_ranks": ctx.pp.ranks, "pp_rank": ctx.pp.rank, "driver": ctx.is_driver,
            "first": ctx.is_first_stage, "last": ctx.is_last_stage,
            "tp_sum": float(ctx.tp.all_reduce(me.clone())), "pp_gather": ctx.pp.all_gather(me.clone(), 0).tolist()}


def _four_ranks(rank, world_size):
    return {"gloo": {n: _gloo_ops(rank, ranks) for n, ranks in GROUPS.items()}, "tp2_pp2": _tp2_pp2(rank)}


@pytest.fixture(scope="module")
def four_ranks():
    """One spawn of 4 ranks for every check here (a spawn costs seconds of imports)."""
    return run_ranks(_four_ranks, 4)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_gloo_communicator_ops_match_hand_computed_values(four_ranks, world_size):
    ranks = GROUPS[world_size]
    for rank, result in enumerate(four_ranks):
        out = result["gloo"][world_size]
        if rank not in ranks:
            assert out is None
            continue
        me = ranks.index(rank)
        for dtype in DTYPES:
            inputs = [rank_input(r, dtype) for r in range(world_size)]
            expected_sum = (torch.arange(35).reshape(SHAPE) - 11) * sum(range(1, world_size + 1)) \
                + 100 * sum(range(world_size))
            assert out[dtype, "all_reduce_in_place"]
            assert torch.equal(out[dtype, "all_reduce"], expected_sum.to(dtype))
            for dim in (0, 1, -1):
                assert torch.equal(out[dtype, "all_gather", dim], torch.cat(inputs, dim=dim))
            assert out[dtype, "all_gather", 0].shape == (7 * world_size, 5)
            assert out[dtype, "all_gather", -1].shape == (7, 5 * world_size)
            assert torch.equal(out[dtype, "broadcast"], inputs[-1])
            assert torch.equal(out[dtype, "recv"], inputs[(me - 1) % world_size])
            assert out[dtype, "recv"].dtype == dtype


def test_init_parallel_context_tp2_pp2_groups(four_ranks):
    for rank, result in enumerate(four_ranks):
        pp_rank, tp_rank = divmod(rank, 2)            # rank = pp_rank * tp + tp_rank
        tp_ranks = [pp_rank * 2, pp_rank * 2 + 1]
        pp_ranks = [tp_rank, tp_rank + 2]
        assert result["tp2_pp2"] == {
            "rank": rank, "world_size": 4, "tp_ranks": tp_ranks, "tp_rank": tp_rank, "pp_ranks": pp_ranks,
            "pp_rank": pp_rank, "driver": rank == 0, "first": pp_rank == 0, "last": pp_rank == 1,
            "tp_sum": float(sum(tp_ranks)), "pp_gather": [float(r) for r in pp_ranks]}


def test_single_rank_communicator_is_the_identity():
    comm = SingleRankCommunicator("cpu")
    x = torch.randn(3, 5)
    before = x.clone()
    assert comm.all_reduce(x) is x and torch.equal(x, before)
    assert torch.equal(comm.all_gather(x, 1), before) and torch.equal(comm.broadcast(x, 0), before)
    assert (comm.rank, comm.world_size) == (0, 1)
    with pytest.raises(ValueError, match="send to rank 1"):
        comm.send(x, 1)
    with pytest.raises(ValueError, match="recv from rank 0"):
        comm.recv(x, 0)
    assert isinstance(new_communicator([5], "cpu"), SingleRankCommunicator)
