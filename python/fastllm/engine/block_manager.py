"""Maps sequences to KV blocks over `ops.BlockAllocator` (the C++ block pool).

Block i of a sequence's block_table holds the KV of positions [i*block_size, (i+1)*block_size).
Prefix caching: every full, computed block is registered under the chained hash
hash_block(parent block's hash, its token ids); a new sequence acquires the blocks of its
longest cached prefix (ref counted, so a shared block is freed only when its last holder
lets go) and computes only the rest. Freed cached blocks stay findable until the allocator
evicts them, least recently freed first; we free a sequence's blocks tail first so its tail
goes before its head.

n > 1 samples (fork): the children share the parent's full prompt blocks (ref_count += 1)
and each gets its own copy of the partial last block, so no copy-on-write is ever needed:
full blocks are read-only, and every sequence writes only into blocks it alone holds.
The copy goes out in the next step's SchedulerOutput (take_copies).

Swap space: `num_swap_blocks` CPU blocks (the runner holds the memory; this class hands
out the ids). swap_out / swap_in move a sequence's KV between the pools and return the
(src, dst) block pairs for the runner to copy; the scheduler only sees block tables.
"""
from __future__ import annotations

from typing import Optional

from fastllm import ops
from fastllm.engine.sequence import Sequence
from fastllm.utils import cdiv, check_positive_int


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 allocator=None, num_swap_blocks: int = 0):
        check_positive_int("block_size", block_size)
        check_positive_int("num_kv_blocks", num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = allocator if allocator is not None else ops.BlockAllocator(num_blocks)
        # Token ids of every block we registered, to verify a hash hit (64-bit hashes collide
        # rarely, but a wrong hit would silently corrupt outputs).
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        # Prefix-cache accounting over admitted sequences (the allocator's own counters also
        # count lookups of admissions that were rolled back for lack of blocks).
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self._pending_copies: list[tuple[int, int]] = []   # fork copies for the next step
        self.num_swap_blocks = num_swap_blocks
        self._free_swap_blocks: list[int] = list(range(num_swap_blocks - 1, -1, -1))

    # -- capacity --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_in_use

    @property
    def num_swap_blocks_used(self) -> int:
        return self.num_swap_blocks - len(self._free_swap_blocks)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    # -- hashing ---------------------------------------------------------------------
    def _block_hash(self, seq: Sequence, i: int) -> int:
        """Chained hash of seq's i-th full block, computing the missing links."""
        bs = self.block_size
        while len(seq.block_hashes) <= i:
            j = len(seq.block_hashes)
            parent = seq.block_hashes[j - 1] if j else 0
            seq.block_hashes.append(ops.hash_block(parent, seq.token_ids[j * bs:(j + 1) * bs]))
        return seq.block_hashes[i]

    # -- allocation ------------------------------------------------------------------
    def acquire_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: take the blocks of its longest cached prefix and
        mark those tokens computed. The last token is always left to compute (its logits
        are needed), so only blocks inside token_ids[:-1] can hit. Returns tokens reused."""
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self.allocator.lookup(self._block_hash(seq, i))
            if block_id < 0:
                break
            if self._block_tokens.get(block_id) != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                self.allocator.free(block_id)          # hash collision: treat as a miss
                break
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(seq.block_table) * bs
        seq.num_registered_blocks = len(seq.block_table)
        return seq.num_computed_tokens

    def record_admission(self, seq: Sequence, num_cached_tokens: int) -> None:
        seq.num_cached_tokens = num_cached_tokens
        if self.enable_prefix_caching:
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += num_cached_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for tokens [num_computed, num_computed + num_new_tokens). All or nothing."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.allocator.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self.allocator.allocate())
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """After a forward pass: offer newly full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        for i in range(seq.num_registered_blocks, num_full):
            block_id = seq.block_table[i]
            if self.allocator.register(block_id, self._block_hash(seq, i)):
                self._block_tokens[block_id] = tuple(seq.token_ids[i * bs:(i + 1) * bs])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Give back every block seq holds, on the GPU and in swap space."""
        self._free_gpu(seq)
        if seq.swapped_kv is not None:
            self._free_swap_blocks.extend(seq.swapped_kv)
            seq.swapped_kv = None

    def _free_gpu(self, seq: Sequence) -> None:
        # Tail first: the LRU then evicts this sequence's tail before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            self.allocator.free(block_id)
        seq.block_table = []

    def trim(self, seq: Sequence) -> None:
        """Free seq's blocks past those its tokens need (speculative decoding: the
        lookahead slots of rejected drafts), tail first."""
        keep = self.blocks_for_tokens(seq.num_tokens)
        while len(seq.block_table) > keep:
            self.allocator.free(seq.block_table.pop())

    def is_private_from(self, seq: Sequence, position: int) -> bool:
        """Whether every block of seq holding positions >= position is seq's alone and
        not offered to the prefix cache, so its KV may be rewritten."""
        first = position // self.block_size
        return first >= seq.num_registered_blocks and all(
            self.allocator.ref_count(b) == 1 for b in seq.block_table[first:])

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Give `child` the parent's KV: shared full blocks, a private copy of the partial
        last block (queued for the runner: take_copies). False, child untouched, when no
        block is free for that copy."""
        bs = self.block_size
        num_full = parent.num_computed_tokens // bs
        partial = parent.num_computed_tokens % bs != 0
        if partial and self.allocator.num_free == 0:
            return False
        for block_id in parent.block_table[:num_full]:
            self.allocator.share(block_id)
        child.block_table = list(parent.block_table[:num_full])
        if partial:
            dst = self.allocator.allocate()
            child.block_table.append(dst)
            self._pending_copies.append((parent.block_table[num_full], dst))
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = min(parent.num_registered_blocks, num_full)
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies queued since the last call, for the next step."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def requeue_copies(self, copies: list[tuple[int, int]]) -> None:
        """Copies taken for a step that never ran: first in the next take_copies()."""
        self._pending_copies = list(copies) + self._pending_copies

    # -- swap space ------------------------------------------------------------------
    def can_swap_out(self, seq: Sequence) -> bool:
        return 0 < len(seq.block_table) <= len(self._free_swap_blocks)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move seq's KV to swap space: its GPU blocks are free for this very step (the
        runner copies them out before the forward pass writes anything). Returns the
        (GPU block, CPU block) pairs; call only when can_swap_out(seq)."""
        cpu_blocks = [self._free_swap_blocks.pop() for _ in seq.block_table]
        pairs = list(zip(seq.block_table, cpu_blocks))
        self._free_gpu(seq)
        seq.swapped_kv = cpu_blocks
        return pairs

    def swap_in_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free GPU blocks a swap-in of seq takes with num_new_tokens to compute: its
        swapped blocks, then whatever more the new tokens need."""
        return max(len(seq.swapped_kv), self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens))

    def swap_in(self, seq: Sequence) -> Optional[list[tuple[int, int]]]:
        """Bring seq's KV back to fresh GPU blocks: (CPU block, GPU block) pairs, or None
        (nothing changed) when too few blocks are free."""
        cpu_blocks = seq.swapped_kv
        if len(cpu_blocks) > self.allocator.num_free:
            return None
        seq.block_table = [self.allocator.allocate() for _ in cpu_blocks]
        seq.num_registered_blocks = 0   # re-offered to the prefix cache on the next commit
        seq.swapped_kv = None
        # Reusable from the next step on: swap-outs only happen in steps that preempt,
        # and those return before any swap-in, so no step both reads and writes them.
        self._free_swap_blocks.extend(cpu_blocks)
        return list(zip(cpu_blocks, seq.block_table))

    def undo_swap_in(self, seq: Sequence, cpu_blocks: list[int]) -> None:
        """Revert a swap_in whose copies never ran: the KV is still in cpu_blocks."""
        self._free_gpu(seq)
        taken = set(cpu_blocks)
        self._free_swap_blocks = [b for b in self._free_swap_blocks if b not in taken]
        seq.swapped_kv = list(cpu_blocks)

    def disable_swap(self) -> None:
        """No more swap space (the runner released it); every swapped sequence must have
        been freed first."""
        if self.num_swap_blocks_used:
            raise RuntimeError(f"{self.num_swap_blocks_used} swap blocks still hold KV")
        self.num_swap_blocks = 0
        self._free_swap_blocks = []

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_prefix_cache()
        self._block_tokens.clear()

    # -- stats -----------------------------------------------------------------------
    def block_fill(self, seqs) -> dict[int, int]:
        """block id -> tokens stored in it, over the blocks these sequences hold; a block
        shared by several sequences (prefix caching, forks) appears once."""
        filled: dict[int, int] = {}
        bs = self.block_size
        for seq in seqs:
            for i, block_id in enumerate(seq.block_table):
                n = min(bs, max(0, seq.num_computed_tokens - i * bs))
                filled[block_id] = max(filled.get(block_id, 0), n)
        return filled

    def slot_utilization(self, seqs) -> float:
        """Tokens stored / slots in the blocks these sequences hold (shared blocks once)."""
        filled = self.block_fill(seqs)
        return sum(filled.values()) / (len(filled) * self.block_size) if filled else 0.0
