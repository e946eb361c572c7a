"""The data-parallel router on its own: hand-computed routing decisions."""
from __future__ import annotations

import pytest

from fastllm.distributed.dp_router import DPRouter, load_score, prefix_block_hashes

BS = 4                                   # block size of these cases


def route_all(router, requests):
    return [router.route(rid, ids) for rid, ids in requests]


def test_score_weights_waiting_four_times_running():
    assert load_score(0, 0) == 0
    assert load_score(1, 0) == 4
    assert load_score(2, 3) == 11


def test_requests_added_together_alternate_between_replicas():
    router = DPRouter(2, BS)
    # Distinct short prompts (no full block: no affinity). Scores before each route:
    # (0,0)->0, (4,0)->1, (4,4)->0, (8,4)->1, (8,8)->0.
    got = route_all(router, [(f"r{i}", [10 + i]) for i in range(5)])
    assert got == [0, 1, 0, 1, 0]
    assert [(l.waiting, l.running) for l in router.loads] == [(3, 0), (2, 0)]


def test_a_waiting_request_costs_four_running_ones():
    router = DPRouter(2, BS)
    for rid in ("a", "b", "c"):
        assert router.route(rid, [1]) == (0 if rid != "b" else 1)
    for rid in ("a", "c"):                # replica 0: 2 running -> score 2
        router.mark_running(rid)
    router.finish("b")                    # replica 1: empty -> score 0
    assert router.route("d", [2]) == 1    # 0 < 2; now replica 1 scores 4 (1 waiting)
    # 2 running (2) beats 1 waiting (4); counting requests alone would say replica 1.
    assert router.route("e", [3]) == 0
    assert [l.score for l in router.loads] == [6, 4]


def test_mark_running_and_finish_move_the_counts():
    router = DPRouter(3, BS)
    assert route_all(router, [("a", [1]), ("b", [2]), ("c", [3])]) == [0, 1, 2]
    router.mark_running("a")
    router.mark_running("a")              # idempotent
    assert [(l.waiting, l.running) for l in router.loads] == [(0, 1), (1, 0), (1, 0)]
    assert router.finish("a") == 0 and router.finish("b") == 1
    assert router.finish("a") is None     # already gone
    assert [(l.waiting, l.running) for l in router.loads] == [(0, 0), (0, 0), (1, 0)]
    assert router.requests_on(2) == ["c"] and router.replica_of("c") == 2


def test_prefix_block_hashes_chain_full_blocks_only():
    a = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 0], BS)
    assert len(a) == 2 and len(b) == 2    # the ninth token makes no full block
    assert a[0] == b[0] and a[1] != b[1]  # same first block, different second
    # Entry 1 names blocks 0..1: a second block equal to a's after another first one differs.
    c = prefix_block_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert c[0] != a[0] and c[1] != a[1]
    assert prefix_block_hashes([1, 2, 3], BS) == []
    assert len(prefix_block_hashes(list(range(40)), BS, max_blocks=3)) == 3


def test_shared_prefix_follows_its_replica_when_scores_tie():
    router = DPRouter(2, BS)
    system = [7, 7, 7, 7, 8, 8, 8, 8]     # two full blocks
    assert router.route("x", [1, 2, 3, 4, 5]) == 0
    assert router.route("p1", system + [9]) == 1      # replica 0 is busier (4 > 0)
    router.finish("x"), router.finish("p1")
    # All idle: the lowest index would take it; affinity sends it where p1 ran.
    assert router.route("p2", system + [10]) == 1
    assert router.route("y", [5, 5, 5, 5, 6]) == 0    # 0 < 4: score first
    assert router.route("p3", system + [11, 12]) == 1  # tie at (4, 4): affinity
    # Not a tie: the score wins over affinity.
    assert router.route("p4", system) == 0            # (4, 8)


def test_longest_shared_prefix_wins_among_tied_replicas():
    router = DPRouter(3, BS)
    one, two, three = [1] * 4, [2] * 4, [3] * 4
    assert router.route("a", one + two) == 0
    router.finish("a")
    assert router.route("busy", [9]) == 0
    assert router.route("b", one + three) == 1        # tie of 1 and 2; block `one` is 0's
    router.finish("busy"), router.finish("b")
    # Block `one` was last routed to 1, blocks `one two` to 0: the longer match wins.
    assert router.route("d", one + two + [5]) == 0
    router.finish("d")
    assert router.route("e", one + three + [6]) == 1


def test_excluded_replicas_take_nothing():
    router = DPRouter(2, BS)
    router.exclude(0)
    assert route_all(router, [("a", [1]), ("b", [2])]) == [1, 1]
    router.exclude(1)
    with pytest.raises(RuntimeError, match="no data-parallel replica"):
        router.route("c", [3])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_replicas"):
        DPRouter(0, BS)
    with pytest.raises(ValueError, match="block_size"):
        DPRouter(2, 0)
    router = DPRouter(2, BS)
    router.route("a", [1])
    with pytest.raises(ValueError, match="already in flight"):
        router.route("a", [1])

