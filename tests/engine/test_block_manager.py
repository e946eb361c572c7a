"""BlockManager over both allocators (the C++ one when built, and the Python twin)."""
import pytest

from fastllm import ops, reference
from fastllm.engine.block_manager import BlockManager
from fastllm.engine.sequence import SequenceGroup
from fastllm.sampling_params import SamplingParams

ALLOCATORS = ["python"] + (["native"] if ops.native_available() else [])


def make_bm(kind, num_blocks=8, block_size=4, prefix=True, num_swap_blocks=0):
    alloc = reference.BlockAllocator(num_blocks) if kind == "python" else ops.BlockAllocator(num_blocks)
    return BlockManager(num_blocks, block_size, prefix, allocator=alloc, num_swap_blocks=num_swap_blocks)


def make_seq(tokens, n=1):
    return SequenceGroup(f"r{id(tokens)}", None, tokens, SamplingParams(n=n)).seqs[0]


def run_prefill(bm, seq):
    """Admit and 'compute' the whole sequence, as the scheduler + runner would."""
    cached = bm.acquire_cached_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)
    return cached


def assert_all_free(bm):
    assert bm.allocator.num_in_use == 0
    assert bm.allocator.num_free == bm.num_blocks
    assert all(bm.allocator.ref_count(b) == 0 for b in range(bm.num_blocks))


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_slots_follow_block_table(kind):
    bm = make_bm(kind)
    seq = make_seq(list(range(10)))
    assert bm.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3            # ceil(10 / 4)
    assert len(set(seq.block_table)) == 3
    slots = [seq.block_table[p // 4] * 4 + p % 4 for p in range(10)]
    assert len(set(slots)) == 10                # distinct blocks: no two positions share a slot
    seq.num_computed_tokens = 10
    assert bm.blocks_needed(seq, 2) == 0        # position 10, 11 fit the third block
    assert bm.blocks_needed(seq, 3) == 1
    bm.free(seq)
    assert seq.block_table == []
    assert_all_free(bm)


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_allocate_is_all_or_nothing(kind):
    bm = make_bm(kind, num_blocks=3)
    a, b = make_seq(list(range(8))), make_seq(list(range(100, 108)))
    assert bm.allocate_slots(a, 8)              # 2 blocks
    assert bm.blocks_needed(b, 8) == 2 > bm.num_free_blocks
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    bm.free(a)
    assert_all_free(bm)


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_prefix_hit_shares_blocks_and_refcounts(kind):
    bm = make_bm(kind, num_blocks=16)
    system = list(range(50, 62))                  # 3 full blocks
    a = make_seq(system + [1, 2])
    b = make_seq(system + [3, 4, 5])
    assert run_prefill(bm, a) == 0
    assert run_prefill(bm, b) == 12               # b computes only its suffix
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    for blk in a.block_table[:3]:
        assert bm.allocator.ref_count(blk) == 2
    bm.free(a)
    for blk in b.block_table[:3]:
        assert bm.allocator.ref_count(blk) == 1   # still held by b
    bm.free(b)
    assert_all_free(bm)
    # Freed cached blocks stay findable: a third request hits all three.
    c = make_seq(system + [9])
    assert run_prefill(bm, c) == 12
    bm.free(c)
    assert_all_free(bm)


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_last_token_is_always_computed(kind):
    bm = make_bm(kind, num_blocks=8)
    prompt = list(range(8))                       # exactly 2 full blocks
    run_prefill(bm, make_seq(prompt))
    again = make_seq(prompt)
    # Only blocks inside prompt[:-1] may hit, so the second block is recomputed.
    assert bm.acquire_cached_prefix(again) == 4
    assert again.num_uncomputed_tokens == 4


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_prefix_caching_off_never_hits(kind):
    bm = make_bm(kind, num_blocks=8, prefix=False)
    prompt = list(range(9))
    a = make_seq(prompt)
    run_prefill(bm, a)
    bm.free(a)
    assert run_prefill(bm, make_seq(prompt)) == 0


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_tail_evicted_before_head(kind):
    bm = make_bm(kind, num_blocks=4)
    a = make_seq(list(range(13)))                 # 3 full blocks + 1 token
    run_prefill(bm, a)
    head, tail = a.block_table[0], a.block_table[2]
    bm.free(a)
    # Fill the pool: the never-cached block goes first, then cached ones, tail first.
    other = make_seq(list(range(1000, 1008)))
    assert bm.allocate_slots(other, 8)            # the uncached partial block + one eviction
    assert tail in other.block_table and head not in other.block_table
    again = make_seq(list(range(13)))
    assert bm.acquire_cached_prefix(again) == 8   # head blocks survived
    bm.free(again)
    bm.free(other)
    assert_all_free(bm)


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_hash_collision_is_a_miss(kind, monkeypatch):
    bm = make_bm(kind, num_blocks=8)
    monkeypatch.setattr(ops, "hash_block", lambda parent, tokens: 12345)
    a = make_seq([1, 2, 3, 4, 5])
    run_prefill(bm, a)
    b = make_seq([6, 7, 8, 9, 10])                # same (fake) hash, different tokens
    assert bm.acquire_cached_prefix(b) == 0
    assert b.block_table == []
    bm.free(a)
    assert_all_free(bm)


@pytest.mark.parametrize("kind", ALLOCATORS)
@pytest.mark.parametrize("prompt_len", [8, 10])
def test_fork_shares_full_blocks_copies_partial(kind, prompt_len):
    bm = make_bm(kind, num_blocks=8, prefix=False)
    group = SequenceGroup("fork", None, list(range(prompt_len)), SamplingParams(n=2))
    parent = group.seqs[0]
    run_prefill(bm, parent)
    from fastllm.engine.sequence import Sequence
    child = Sequence(group.prompt_token_ids, group, 1)
    assert bm.fork(parent, child)
    copies = bm.take_copies()
    assert bm.take_copies() == []               # handed out once
    assert child.block_table[:2] == parent.block_table[:2]
    for blk in parent.block_table[:2]:
        assert bm.allocator.ref_count(blk) == 2
    if prompt_len % 4:
        [(src, dst)] = copies
        assert src == parent.block_table[2] and dst == child.block_table[2] and src != dst
        assert not bm.is_private_from(child, 0) and bm.is_private_from(child, 8)
    else:
        assert copies == [] and len(child.block_table) == 2
    assert child.num_computed_tokens == prompt_len
    bm.free(parent)
    bm.free(child)
    assert_all_free(bm)


def test_py_allocator_contract():
    a = reference.BlockAllocator(2)
    x, y = a.allocate(), a.allocate()
    with pytest.raises(RuntimeError):
        a.allocate()
    assert a.register(x, 7) and not a.register(y, 7)
    a.share(y)
    assert a.ref_count(y) == 2
    a.free(x)
    a.free(y)
    a.free(y)
    with pytest.raises(ValueError):
        a.free(y)
    with pytest.raises(ValueError):
        a.share(y)
    with pytest.raises(ValueError):
        a.free(5)
    assert a.num_free == 2 and a.num_cached == 1
    assert a.lookup(7) == x and a.hits == 1 and a.queries == 1 and a.ref_count(x) == 1
    assert a.lookup(8) == -1 and a.queries == 2
    a.free(x)
    assert a.allocate() == y                      # never-cached block first
    assert a.allocate() == x and a.evictions == 1 and a.lookup(7) == -1


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_fork_without_a_free_block_leaves_the_child_untouched(kind):
    bm = make_bm(kind, num_blocks=3, prefix=False)
    group = SequenceGroup("fork", None, list(range(10)), SamplingParams(n=2))
    parent = group.seqs[0]
    run_prefill(bm, parent)                       # all 3 blocks, the last one partial
    from fastllm.engine.sequence import Sequence
    child = Sequence(group.prompt_token_ids, group, 1)
    assert not bm.fork(parent, child)
    assert child.block_table == [] and child.num_computed_tokens == 0 and bm.take_copies() == []
    assert [bm.allocator.ref_count(b) for b in parent.block_table] == [1, 1, 1]


@pytest.mark.parametrize("kind", ALLOCATORS)
def test_swap_space_ids_are_the_block_managers(kind):
    """swap_out frees the GPU blocks and hands back (GPU, CPU) pairs; swap_in the reverse
    into fresh GPU blocks; undo_swap_in restores the swapped state; free() returns CPU
    blocks too; disable_swap refuses while KV is still swapped out."""
    bm = make_bm(kind, num_blocks=6, num_swap_blocks=3)
    a = make_seq(list(range(10)))
    run_prefill(bm, a)
    gpu = list(a.block_table)
    assert bm.can_swap_out(a)
    out_pairs = bm.swap_out(a)
    assert [g for g, _ in out_pairs] == gpu and len({c for _, c in out_pairs}) == 3
    assert a.block_table == [] and bm.num_used_blocks == 0 and bm.num_swap_blocks_used == 3
    assert not bm.can_swap_out(make_seq([1]))     # no block held: nothing to swap
    with pytest.raises(RuntimeError, match="swap blocks still hold KV"):
        bm.disable_swap()
    cpu = list(a.swapped_kv)
    in_pairs = bm.swap_in(a)
    assert [c for c, _ in in_pairs] == cpu and [g for _, g in in_pairs] == a.block_table
    assert a.swapped_kv is None and bm.num_swap_blocks_used == 0 and bm.num_used_blocks == 3
    bm.undo_swap_in(a, cpu)
    assert a.swapped_kv == cpu and a.block_table == [] and bm.num_swap_blocks_used == 3
    bm.free(a)
    assert bm.num_swap_blocks_used == 0 and a.swapped_kv is None
    bm.disable_swap()
    b = make_seq(list(range(20, 30)))
    run_prefill(bm, b)
    assert not bm.can_swap_out(b) and bm.num_swap_blocks == 0
    bm.free(b)
    assert_all_free(bm)
