"""BlockAllocator (C++) against its pure-Python twin (fastllm.reference.BlockAllocator),
step by step, plus hand-checked error cases."""
import pytest

pytest.importorskip("hypothesis")  # a test dependency; GPU boxes without it skip this file
from hypothesis import given, settings, strategies as st  # noqa: E402

from fastllm import ops, reference

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")


def test_errors_are_clear():
    a = ops.BlockAllocator(2)
    b = a.allocate()
    a.free(b)
    with pytest.raises(ValueError, match="double free"):
        a.free(b)
    with pytest.raises(ValueError, match="unknown block id 5"):
        a.free(5)
    a.allocate(), a.allocate()
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        a.allocate()
    with pytest.raises(ValueError, match="num_blocks"):
        ops.BlockAllocator(0)


def test_hash_block_chains():
    h1 = ops.hash_block(0, [1, 2, 3, 4])
    assert h1 == ops.hash_block(0, [1, 2, 3, 4])
    assert ops.hash_block(h1, [5, 6]) != ops.hash_block(0, [5, 6])
    assert 0 <= h1 < 2 ** 64


ops_strategy = st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "register", "lookup"]),
                                  st.integers(0, 10 ** 6), st.integers(0, 12)), max_size=300)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), script=ops_strategy)
def test_random_sequences_match_reference_and_never_leak(num_blocks, script):
    a, m = ops.BlockAllocator(num_blocks), reference.BlockAllocator(num_blocks)
    held = []  # one entry per reference held
    for op, pick, h in script:
        if op == "alloc" and a.num_free > 0:
            b = a.allocate()
            assert b == m.allocate()
            held.append(b)
        elif op == "free" and held:
            b = held.pop(pick % len(held))
            a.free(b)
            m.free(b)
        elif op == "share" and held:
            b = held[pick % len(held)]
            a.share(b)
            m.share(b)
            held.append(b)
        elif op == "register" and held:
            b = held[pick % len(held)]
            if a.block_hash(b) is None:
                assert a.register(b, h) == m.register(b, h)
        elif op == "lookup":
            b = a.lookup(h)
            assert b == m.lookup(h)
            if b >= 0:
                held.append(b)
        refs = [a.ref_count(i) for i in range(num_blocks)]
        assert refs == [m.ref_count(i) for i in range(num_blocks)]
        assert refs == [held.count(i) for i in range(num_blocks)]  # no leak, no double count
        assert a.num_in_use == len(set(held)) and a.num_free == num_blocks - len(set(held))
        assert (a.hits, a.queries, a.evictions, a.num_cached) == (m.hits, m.queries, m.evictions, m.num_cached)
    for b in held:
        a.free(b)
    assert a.num_free == num_blocks and a.num_in_use == 0
    a.reset_prefix_cache()
    assert a.num_cached == 0 and a.lookup(0) == -1
