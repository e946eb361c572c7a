"""Continuous-batching scheduler: which tokens of which sequences run in the next step.

Each step has a token budget (max_num_batched_tokens) and a cap on running sequences
(max_num_seqs). Running sequences go first, in arrival order: decodes (1 token) and
ongoing prefill chunks; then swapped-out sequences come back; then waiting requests are
admitted FCFS, their prompt chunked to what is left of the budget when chunked prefill is
on. When the KV cache runs out, the most recently arrived running sequence is preempted:
by recompute (its blocks are freed and it goes back to the head of the waiting queue) or,
with swap_space > 0, by copying its KV to CPU memory until blocks free up again.

The scheduler only decides: the block moves (swap out, swap in, fork copies) go out in
SchedulerOutput and the ModelRunner carries them out before its forward pass, so data
flows one way (engine -> scheduler -> block manager; engine -> runner -> sampler).
"""
from __future__ import annotations

import bisect
import collections
import logging
from dataclasses import dataclass, field
from typing import Optional

from fastllm.engine.block_manager import BlockManager
from fastllm.engine.sequence import Sequence, SequenceGroup, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int            # tokens fed this step: positions [num_computed, num_computed + num_tokens)
    num_samples: int = 0       # tokens to sample from its last row (0 mid-prefill; n when a group forks)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    # Block moves for the runner, applied before the forward pass (see ModelRunner.apply_cache_ops):
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, CPU block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)   # (CPU block, GPU block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)      # (src, dst): forks since the last step

    @property
    def has_cache_ops(self) -> bool:
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.has_cache_ops


class Scheduler:
    def __init__(self, config, block_manager: BlockManager, num_swap_blocks: int = 0):
        """num_swap_blocks: blocks of CPU swap space (ModelRunner.num_swap_blocks); 0 = always
        preempt by recompute."""
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []       # sorted by Sequence.sort_key (arrival order)
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.groups: dict[str, SequenceGroup] = {}
        self.num_preemptions = 0
        self.num_swaps_out = 0
        self.num_prefill_tokens_computed = 0    # prompt (and recomputed) tokens fed to the model
        self.num_decode_tokens_computed = 0
        self.num_swap_blocks = num_swap_blocks
        self.free_swap_blocks: list[int] = list(range(num_swap_blocks - 1, -1, -1))
        self._pending_copies: list[tuple[int, int]] = []   # fork copies for the next step

    @property
    def num_swap_blocks_used(self) -> int:
        return self.num_swap_blocks - len(self.free_swap_blocks)

    # -- queue management --------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        """Queue a request, or raise ValueError if it could never run."""
        cfg, bm = self.config, self.block_manager
        if group.request_id in self.groups:
            raise ValueError(f"request_id {group.request_id!r} is already in flight")
        if group.prompt_len == 0:
            raise ValueError(f"request {group.request_id!r}: prompt is empty")
        if group.prompt_len >= cfg.max_model_len:
            raise ValueError(
                f"request {group.request_id!r}: prompt ({group.prompt_len} tokens) leaves no room "
                f"to generate within max_model_len={cfg.max_model_len}")
        max_tokens = self.max_new_tokens(group)
        total = group.prompt_len + max_tokens
        if total > cfg.max_model_len:
            raise ValueError(
                f"request {group.request_id!r}: prompt ({group.prompt_len} tokens) + max_tokens "
                f"({max_tokens}) = {total} exceeds max_model_len={cfg.max_model_len}")
        if bm.blocks_for_tokens(total) > bm.num_blocks:
            raise ValueError(
                f"request {group.request_id!r} needs {bm.blocks_for_tokens(total)} KV blocks "
                f"({total} tokens) but the whole cache has {bm.num_blocks} blocks of "
                f"{bm.block_size} tokens; raise num_kv_blocks / gpu_memory_utilization or "
                f"lower max_tokens")
        if not cfg.enable_chunked_prefill and total > cfg.max_num_batched_tokens:
            raise ValueError(
                f"request {group.request_id!r}: {total} tokens do not fit max_num_batched_tokens="
                f"{cfg.max_num_batched_tokens} with chunked prefill disabled")
        self.groups[group.request_id] = group
        self.waiting.append(group.seqs[0])

    def max_new_tokens(self, group: SequenceGroup) -> int:
        max_tokens = getattr(group.sampling_params, "max_tokens", None)
        if max_tokens is None:
            return max(0, self.config.max_model_len - group.prompt_len)
        return max_tokens

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def _insert_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        keys = [s.sort_key() for s in self.running]
        self.running.insert(bisect.bisect(keys, seq.sort_key()), seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        """Keep the waiting queue in arrival order (preempted sequences go back near the head)."""
        seq.status = SequenceStatus.WAITING
        key = seq.sort_key()
        idx = 0
        while idx < len(self.waiting) and self.waiting[idx].sort_key() < key:
            idx += 1
        self.waiting.insert(idx, seq)

    def _remove(self, seq: Sequence) -> None:
        for queue in (self.running, self.waiting, self.swapped):
            if seq in queue:
                queue.remove(seq)
                return

    # -- preemption ---------------------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)
        n = len(seq.block_table)
        if n and len(self.free_swap_blocks) >= n:
            # The GPU blocks are free for this very step: the runner copies them out
            # before the forward pass writes anything.
            cpu_blocks = [self.free_swap_blocks.pop() for _ in range(n)]
            out.blocks_to_swap_out.extend(zip(seq.block_table, cpu_blocks))
            seq.swapped_kv = cpu_blocks
            self.num_swaps_out += 1
            self.block_manager.free(seq)
            seq.status = SequenceStatus.SWAPPED
            seq.num_preemptions += 1
            keys = [s.sort_key() for s in self.swapped]
            self.swapped.insert(bisect.bisect(keys, seq.sort_key()), seq)
            how = "swapped out to CPU"
        else:
            self.block_manager.free(seq)
            seq.reset_for_recompute()
            self._insert_waiting(seq)
            how = "will be recomputed"
        if self.num_preemptions == 1 or self.num_preemptions % 100 == 0:
            logger.warning(
                "KV cache is full: preempted request %r (%s); %d preemption(s) so far. Raise "
                "num_kv_blocks or gpu_memory_utilization, or lower max_num_seqs / "
                "max_num_batched_tokens%s.", seq.request_id, how, self.num_preemptions,
                "" if self.num_swap_blocks else ", or set swap_space")

    def _swap_in_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks a swap-in of seq takes with num_new_tokens to compute: its swapped KV
        blocks, then whatever more the new tokens need. Exact, not assuming the swapped
        blocks cover exactly the computed tokens."""
        bm = self.block_manager
        return max(len(seq.swapped_kv), bm.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens))

    def _swap_in(self, seq: Sequence, out: SchedulerOutput) -> bool:
        cpu_blocks = seq.swapped_kv
        if len(cpu_blocks) > self.block_manager.num_free_blocks:
            return False
        block_ids = [self.block_manager.allocator.allocate() for _ in cpu_blocks]
        out.blocks_to_swap_in.extend(zip(cpu_blocks, block_ids))
        seq.block_table = block_ids
        seq.num_registered_blocks = 0   # re-offered to the prefix cache on the next commit
        seq.swapped_kv = None
        # Reusable from the next step on: swap-outs only happen in steps that preempt,
        # and those return before any swap-in, so no step both reads and writes them.
        self.free_swap_blocks.extend(cpu_blocks)
        return True

    # -- the step -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput(blocks_to_copy=self._pending_copies)
        self._pending_copies = []
        budget = cfg.max_num_batched_tokens

        def add(seq: Sequence, n: int) -> None:
            nonlocal budget
            samples = 0
            if seq.num_computed_tokens + n == seq.num_tokens:
                samples = seq.group.n if not seq.group.forked else 1
            out.scheduled.append(ScheduledSeq(seq, n, samples))
            budget -= n

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            n = min(seq.num_uncomputed_tokens, budget)
            while not bm.allocate_slots(seq, n):
                self._preempt(self.running[-1], out)
                if seq.status is not SequenceStatus.RUNNING:   # it was the newest: nothing left
                    break
            if seq.status is SequenceStatus.RUNNING:
                add(seq, n)
                idx += 1
        if out.preempted:
            return self._finish(out)

        # 2. Swapped-out sequences come back before anything new is admitted.
        swapped_in: list[tuple[Sequence, list[int]]] = []     # (seq, its swap-space blocks)
        while self.swapped and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if self._swap_in_blocks_needed(seq, n) > bm.num_free_blocks:
                break
            self.swapped.popleft()
            cpu_blocks = seq.swapped_kv
            # The check above counted both the swapped blocks and the new slots, and
            # num_free_blocks is what allocate() can hand out (free + evictable cached), so
            # neither call can fail. If one does anyway (a bug), going on would feed the model
            # positions past the end of seq's block table: undo this call's swap-ins (the
            # runner has seen none of them) so the queues stay consistent, then raise.
            ok = self._swap_in(seq, out)
            swapped_in.append((seq, cpu_blocks))
            if not (ok and bm.allocate_slots(seq, n)):
                self._undo_swap_ins(out, swapped_in)
                raise RuntimeError(f"scheduler: no KV blocks for {n} tokens of swapped-in "
                                   f"sequence {seq.seq_id} (request {seq.request_id!r}) after "
                                   f"the free-block check passed")
            self._insert_running(seq)
            add(seq, n)
        if self.swapped:
            return self._finish(out)

        # 3. Admit waiting requests FCFS (head-of-line: stop at the first that does not fit).
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            num_cached = bm.acquire_cached_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget and not cfg.enable_chunked_prefill:
                self._rollback_admission(seq)
                break
            n = min(n, budget)
            if not bm.allocate_slots(seq, n):
                self._rollback_admission(seq)
                break
            self.waiting.popleft()
            bm.record_admission(seq, num_cached)
            self._insert_running(seq)
            add(seq, n)
        return self._finish(out)

    def _undo_swap_ins(self, out: SchedulerOutput, swapped_in: list) -> None:
        """Put the sequences swapped in by this schedule() back in swap space as they were
        (their KV is still there: the copies in out.blocks_to_swap_in never ran) and keep
        this step's fork copies pending, so a failed schedule() loses nothing."""
        undone = {id(seq) for seq, _ in swapped_in}
        out.scheduled = [s for s in out.scheduled if id(s.seq) not in undone]
        for seq, cpu_blocks in reversed(swapped_in):     # popped from the head, in order
            if seq in self.running:
                self.running.remove(seq)
            self.block_manager.free(seq)
            taken = set(cpu_blocks)
            self.free_swap_blocks = [b for b in self.free_swap_blocks if b not in taken]
            seq.swapped_kv = cpu_blocks
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
        out.blocks_to_swap_in.clear()
        self._pending_copies = out.blocks_to_copy + self._pending_copies

    def _rollback_admission(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def _finish(self, out: SchedulerOutput) -> SchedulerOutput:
        # Feed sequences to the model in arrival order (stable batches, easy to read).
        out.scheduled.sort(key=lambda s: s.seq.sort_key())
        out.num_batched_tokens = sum(s.num_tokens for s in out.scheduled)
        return out

    # -- after the forward pass -----------------------------------------------------------
    def mark_computed(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            seq = s.seq
            if s.num_tokens > 1 or seq.num_output_tokens == 0:
                self.num_prefill_tokens_computed += s.num_tokens
            else:
                self.num_decode_tokens_computed += s.num_tokens
            seq.num_computed_tokens += s.num_tokens
            seq.num_tokens_fed += s.num_tokens
            self.block_manager.commit_computed(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start sample `child` (its first token already appended) from the parent's KV, or
        queue it for recompute when no block or running slot is free."""
        if len(self.running) < self.config.max_num_seqs:
            try:
                copy = self.block_manager.fork(parent, child)
            except RuntimeError:
                copy = False
            if copy is not False:
                if copy is not None:
                    self._pending_copies.append(copy)     # the runner copies it next step
                self._insert_running(child)
                return
        child.block_hashes = list(parent.block_hashes)
        self._insert_waiting(child)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self._remove(seq)
        self._release(seq)
        seq.status = status

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.swapped_kv is not None:
            self.free_swap_blocks.extend(seq.swapped_kv)
            seq.swapped_kv = None

    def abort(self, request_id: str) -> Optional[SequenceGroup]:
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.status.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return group

    def retire(self, group: SequenceGroup) -> None:
        self.groups.pop(group.request_id, None)
