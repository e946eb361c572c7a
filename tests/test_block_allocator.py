"""BlockAllocator (C++) against a Python model of ref counts and the prefix-cache LRU."""
from collections import OrderedDict

import pytest
from hypothesis import given, settings, strategies as st

from fastllm import ops

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


class Model:
    """Reference semantics: free blocks are taken before cached-free ones, which are
    evicted least recently freed first."""

    def __init__(self, n):
        self.ref = [0] * n
        self.free = list(range(n - 1, -1, -1))
        self.lru = OrderedDict()          # cached-free block -> None, oldest first
        self.hash_of, self.block_of = {}, {}
        self.hits = self.queries = self.evictions = 0

    def allocate(self):
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.lru.popitem(last=False)
            del self.block_of[self.hash_of.pop(b)]
            self.evictions += 1
        self.ref[b] = 1
        return b

    def release(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.hash_of:
                self.lru[b] = None
            else:
                self.free.append(b)

    def lookup(self, h):
        self.queries += 1
        b = self.block_of.get(h, -1)
        if b >= 0:
            self.lru.pop(b, None)
            self.ref[b] += 1
            self.hits += 1
        return b


ops_strategy = st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "register", "lookup"]),
                                  st.integers(0, 10 ** 6), st.integers(0, 12)), max_size=300)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), script=ops_strategy)
def test_random_sequences_never_leak_or_double_count(num_blocks, script):
    a, m = ops.BlockAllocator(num_blocks), Model(num_blocks)
    held = []  # one entry per reference held
    for op, pick, h in script:
        if op == "alloc" and a.num_free > 0:
            b = a.allocate()
            assert b == m.allocate()
            held.append(b)
        elif op == "free" and held:
            b = held.pop(pick % len(held))
            a.free(b)
            m.release(b)
        elif op == "share" and held:
            b = held[pick % len(held)]
            a.share(b)
            m.ref[b] += 1
            held.append(b)
        elif op == "register" and held:
            b = held[pick % len(held)]
            if b not in m.hash_of:
                ok = a.register(b, h)
                assert ok == (h not in m.block_of)
                if ok:
                    m.hash_of[b], m.block_of[h] = h, b
        elif op == "lookup":
            b = a.lookup(h)
            assert b == m.lookup(h)
            if b >= 0:
                held.append(b)
        assert [a.ref_count(i) for i in range(num_blocks)] == m.ref
        assert a.num_in_use == len(set(held)) and a.num_free == num_blocks - len(set(held))
        assert (a.hits, a.queries, a.evictions, a.num_cached) == (m.hits, m.queries, m.evictions, len(m.block_of))
    for b in held:
        a.free(b)
    assert a.num_free == num_blocks and a.num_in_use == 0
    a.reset_prefix_cache()
    assert a.num_cached == 0 and a.lookup(0) == -1
