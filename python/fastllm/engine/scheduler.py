"""Continuous-batching scheduler: which tokens of which sequences run in the next step,
and all the bookkeeping after it.

Each step has a token budget (max_num_batched_tokens) and a cap on running sequences
(max_num_seqs). Running sequences go first, in arrival order: decodes (1 token) and
ongoing prefill chunks; then swapped-out sequences come back; then waiting requests are
admitted FCFS, their prompt chunked to what is left of the budget when chunked prefill is
on. When the KV cache runs out, the most recently arrived running sequence is preempted:
by recompute (its blocks are freed and it goes back to the head of the waiting queue) or,
with swap space, by copying its KV to CPU memory until blocks free up again.

schedule() -> SchedulerOutput (plain data, fastllm.engine.step_data): the tokens to
feed, their block tables, and the block moves (swap out, swap in, fork copies) the
runner carries out before its forward pass. update(SchedulerOutput, RunnerOutput) then
does everything the step's samples imply, as vLLM's update_from_output / check_stop do:
computed tokens, appended samples, n > 1 forks, stop tokens and lengths, freeing.
Every block id comes from the BlockManager; data flows one way (engine -> scheduler ->
block manager; engine -> runner -> sampler; plain data back).
"""
from __future__ import annotations

import bisect
import collections
import logging
import time
from typing import Optional

from fastllm.engine.block_manager import BlockManager
from fastllm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from fastllm.engine.step_data import (NewRequest, RunnerOutput, SampledToken, ScheduledSeq,
                                      SchedulerOutput)

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config, block_manager: BlockManager, structured_output_manager=None,
                 spec_planner=None):
        """Swap space is the block manager's (num_swap_blocks); none = always preempt by
        recompute. structured_output_manager (fastllm.structured, the engine's): the
        grammars of constrained requests; None = no request is constrained.
        spec_planner: a fastllm.spec_decode.planner.SpecPlanner when speculative decoding
        is on."""
        self.config = config
        self.block_manager = block_manager
        self.structured = structured_output_manager
        self.spec = spec_planner
        self._step_spec: dict[int, tuple[int, list[int]]] = {}   # seq id -> (lookahead, drafts)
        self.num_spec_draft_tokens = 0       # drafts verified, accepted and accepted/verify
        self.num_spec_accepted_tokens = 0
        self.num_spec_verifications = 0      # sequence-steps that verified >= 1 draft
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []       # sorted by Sequence.sort_key (arrival order)
        self.swapped: collections.deque[Sequence] = collections.deque()
        self.groups: dict[str, SequenceGroup] = {}
        self.num_preemptions = 0
        self.num_swaps_out = 0
        self.num_prefill_tokens_computed = 0    # prompt (and recomputed) tokens fed to the model
        self.num_decode_tokens_computed = 0
        self._runner_requests: set[str] = set()   # sent to the runner in a NewRequest
        self._finished_ids: list[str] = []        # of those, finished since the last output
        # seq id -> sequence, for every step scheduled and not yet update()d: one, or with
        # pipeline microbatches up to pipeline_parallel_size disjoint ones.
        self._in_flight: dict[int, Sequence] = {}
        self._grammar_failures: list[SequenceGroup] = []   # aborted: their grammar did not compile

    # -- queue management --------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        """Queue a request, or raise ValueError if it could never run."""
        cfg, bm = self.config, self.block_manager
        rid = group.request_id
        if rid in self.groups:
            raise ValueError(f"request_id {rid!r} is already in flight")
        if group.prompt_len == 0:
            raise ValueError(f"request {rid!r}: prompt is empty")
        if group.prompt_len >= cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt ({group.prompt_len} tokens) leaves no room "
                f"to generate within max_model_len={cfg.max_model_len}")
        max_tokens = self.max_new_tokens(group)
        total = group.prompt_len + max_tokens
        if total > cfg.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt ({group.prompt_len} tokens) + max_tokens "
                f"({max_tokens}) = {total} exceeds max_model_len={cfg.max_model_len}")
        if bm.blocks_for_tokens(total) > bm.num_blocks:
            raise ValueError(
                f"request {rid!r} needs {bm.blocks_for_tokens(total)} KV blocks "
                f"({total} tokens) but the whole cache has {bm.num_blocks} blocks of "
                f"{bm.block_size} tokens; raise num_kv_blocks / gpu_memory_utilization or "
                f"lower max_tokens")
        if not cfg.enable_chunked_prefill and total > cfg.max_num_batched_tokens:
            raise ValueError(
                f"request {rid!r}: {total} tokens do not fit max_num_batched_tokens="
                f"{cfg.max_num_batched_tokens} with chunked prefill disabled")
        self.groups[rid] = group
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
        bm = self.block_manager
        self.running.remove(seq)
        self.num_preemptions += 1
        if bm.can_swap_out(seq):
            out.blocks_to_swap_out.extend(bm.swap_out(seq))
            self.num_swaps_out += 1
            seq.status = SequenceStatus.SWAPPED
            seq.num_preemptions += 1
            keys = [s.sort_key() for s in self.swapped]
            self.swapped.insert(bisect.bisect(keys, seq.sort_key()), seq)
            how = "swapped out to CPU"
        else:
            bm.free(seq)
            seq.reset_for_recompute()
            self._insert_waiting(seq)
            how = "will be recomputed"
        if self.num_preemptions == 1 or self.num_preemptions % 100 == 0:
            logger.warning(
                "KV cache is full: preempted request %r (%s); %d preemption(s) so far. Raise "
                "num_kv_blocks or gpu_memory_utilization, or lower max_num_seqs / "
                "max_num_batched_tokens%s.", seq.request_id, how, self.num_preemptions,
                "" if bm.num_swap_blocks else ", or set swap_space")

    def stop_swapping(self) -> None:
        """The swap space is going away (LLMEngine.close): swapped sequences go back to
        the waiting queue to be recomputed, and preemption recomputes from now on."""
        while self.swapped:
            seq = self.swapped.popleft()
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.num_registered_blocks = 0
            self._insert_waiting(seq)
        self.block_manager.disable_swap()

    # -- the step -----------------------------------------------------------------------
    def schedule(self, max_seqs: Optional[int] = None) -> SchedulerOutput:
        """The next step. Sequences of steps still in flight (scheduled, not yet
        update()d: pipeline microbatches) are left out: their next tokens are unknown.
        max_seqs: at most this many sequences (a microbatch's share), else max_num_seqs."""
        out = SchedulerOutput(blocks_to_copy=self.block_manager.take_copies())
        picked: list[tuple[Sequence, int]] = []     # (seq, tokens to feed)
        self._step_spec = {}
        limit = max_seqs or self.config.max_num_seqs
        budget, preempted = self._schedule_running(out, picked, self.config.max_num_batched_tokens, limit)
        if not preempted:                 # a step that preempts admits nothing else
            budget = self._schedule_swapped(out, picked, budget, limit)
            if not self.swapped:
                self._schedule_waiting(picked, budget, limit)
        return self._finish(out, picked)

    def _schedule_running(self, out: SchedulerOutput, picked: list, budget: int,
                          limit: int) -> tuple[int, bool]:
        """Running sequences, oldest first; preempt from the newest end when blocks run out
        (never one in flight: a step in the pipeline still writes its blocks).
        -> (budget left, whether anything was preempted)."""
        preempted = False
        idx = 0
        while idx < len(self.running) and budget > 0 and len(picked) < limit:
            seq = self.running[idx]
            if seq.seq_id in self._in_flight:
                idx += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            lookahead = self._speculate(seq, budget)
            if lookahead:
                picked.append((seq, n))
                budget -= n + lookahead
                idx += 1
                continue
            while not self.block_manager.allocate_slots(seq, n):
                self._preempt(self._preemption_victim(), out)
                preempted = True
                if seq.status is not SequenceStatus.RUNNING:   # it was the newest: nothing left
                    break
            if seq.status is SequenceStatus.RUNNING:
                picked.append((seq, n))
                budget -= n
                idx += 1
        return budget, preempted

    def _speculate(self, seq: Sequence, budget: int) -> int:
        """Reserve seq's lookahead slots for this step's drafts (n-gram drafts are found
        here) -> their number, 0 when seq does not speculate. Never preempts: without
        free blocks for the lookahead, seq decodes one token as usual."""
        if self.spec is None:
            return 0
        k = self.spec.max_drafts(seq, budget, self.max_new_tokens(seq.group), self.config.max_model_len)
        if not k:
            return 0
        drafts = self.spec.propose(seq.token_ids, k)
        if drafts is not None:
            if not drafts:
                return 0
            k = len(drafts)
        if not self.block_manager.allocate_slots(seq, 1 + k):
            return 0
        self._step_spec[seq.seq_id] = (k, drafts or [])
        return k

    def _preemption_victim(self) -> Sequence:
        """The newest running sequence not in flight (at worst the one being scheduled)."""
        for seq in reversed(self.running):
            if seq.seq_id not in self._in_flight:
                return seq
        raise AssertionError("scheduler: every running sequence is in flight")

    def _schedule_swapped(self, out: SchedulerOutput, picked: list, budget: int, limit: int) -> int:
        """Swapped-out sequences come back before anything new is admitted."""
        bm = self.block_manager
        swapped_in: list[tuple[Sequence, list[int]]] = []     # (seq, its swap-space blocks)
        while (self.swapped and budget > 0 and len(picked) < limit
               and len(self.running) < self.config.max_num_seqs):
            seq = self.swapped[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if bm.swap_in_blocks_needed(seq, n) > bm.num_free_blocks:
                break
            self.swapped.popleft()
            cpu_blocks = seq.swapped_kv
            # The check above counted both the swapped blocks and the new slots, and
            # num_free_blocks is what allocate() can hand out (free + evictable cached), so
            # neither call can fail. If one does anyway (a bug), going on would feed the model
            # positions past the end of seq's block table: undo this call's swap-ins (the
            # runner has seen none of them) so the queues stay consistent, then raise.
            pairs = bm.swap_in(seq)
            swapped_in.append((seq, cpu_blocks))
            if pairs is None or not bm.allocate_slots(seq, n):
                self._undo_swap_ins(out, picked, swapped_in)
                raise RuntimeError(f"scheduler: no KV blocks for {n} tokens of swapped-in "
                                   f"sequence {seq.seq_id} (request {seq.request_id!r}) after "
                                   f"the free-block check passed")
            out.blocks_to_swap_in.extend(pairs)
            self._insert_running(seq)
            picked.append((seq, n))
            budget -= n
        return budget

    def _schedule_waiting(self, picked: list, budget: int, limit: int) -> None:
        """Admit waiting requests FCFS (head-of-line: stop at the first that does not fit)."""
        cfg, bm = self.config, self.block_manager
        idx = 0              # past the requests whose grammar still compiles (skipped, not waited for)
        while (idx < len(self.waiting) and budget > 0 and len(picked) < limit
               and len(self.running) < cfg.max_num_seqs):
            seq = self.waiting[idx]
            if not self._grammar_ready(seq):
                if seq.status is SequenceStatus.WAITING:    # still compiling (else aborted: gone)
                    idx += 1
                continue
            num_cached = bm.acquire_cached_prefix(seq)
            n = seq.num_uncomputed_tokens
            if n > budget and not cfg.enable_chunked_prefill:
                self._rollback_admission(seq)
                break
            n = min(n, budget)
            if not bm.allocate_slots(seq, n):
                self._rollback_admission(seq)
                break
            del self.waiting[idx]
            bm.record_admission(seq, num_cached)
            self._insert_running(seq)
            picked.append((seq, n))
            budget -= n

    def _undo_swap_ins(self, out: SchedulerOutput, picked: list, swapped_in: list) -> None:
        """Put the sequences swapped in by this schedule() back in swap space as they were
        (their KV is still there: the copies in out.blocks_to_swap_in never ran) and keep
        this step's fork copies pending, so a failed schedule() loses nothing."""
        undone = {id(seq) for seq, _ in swapped_in}
        picked[:] = [(seq, n) for seq, n in picked if id(seq) not in undone]
        for seq, cpu_blocks in reversed(swapped_in):     # popped from the head, in order
            if seq in self.running:
                self.running.remove(seq)
            self.block_manager.undo_swap_in(seq, cpu_blocks)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.appendleft(seq)
        out.blocks_to_swap_in.clear()
        self.block_manager.requeue_copies(out.blocks_to_copy)

    def _grammar_ready(self, seq: Sequence) -> bool:
        """Unconstrained, or its grammar compiled (its matcher made on first admission)."""
        request = seq.group.structured_request
        if request is None or seq.grammar is not None:
            return True
        try:
            seq.grammar = self.structured.grammar_for(request)
        except RuntimeError as e:          # parsed but not compiled (out of memory, say)
            logger.error("request %r: %s; aborting it", seq.request_id, e)
            seq.group.forked = True        # it never runs: finished as it stands
            self._grammar_failures.append(self.abort(seq.request_id))
            return False
        return seq.grammar is not None

    def take_grammar_failures(self) -> list[SequenceGroup]:
        """The requests aborted since the last call because their grammar failed to compile
        (the engine reports them as finished, finish_reason "abort")."""
        failures, self._grammar_failures = self._grammar_failures, []
        return failures

    def _rollback_admission(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def _finish(self, out: SchedulerOutput, picked: list) -> SchedulerOutput:
        """The picked sequences as plain data, in arrival order (stable batches, easy to
        read); the requests the runner sees for the first time; the finished ones."""
        picked.sort(key=lambda p: p[0].sort_key())
        now = time.time()
        constrained = []            # sampled this step under a grammar: their bitmask rows
        for seq, n in picked:
            scheduled = self._scheduled_seq(seq, n, *self._step_spec.get(seq.seq_id, (0, ())))
            out.scheduled.append(scheduled)
            self._in_flight[seq.seq_id] = seq
            if seq.grammar is not None and scheduled.num_samples:
                constrained.append(seq)
            group = seq.group
            if group.first_scheduled_time is None:
                group.first_scheduled_time = now
            if group.request_id not in self._runner_requests:
                self._runner_requests.add(group.request_id)
                out.new_requests.append(NewRequest(group.request_id, group.prompt_token_ids,
                                                   group.sampling_params))
        if constrained:
            out.grammar_bitmask = self.structured.fill_bitmask([seq.grammar for seq in constrained])
            out.grammar_seq_ids = [seq.seq_id for seq in constrained]
        if not out.is_empty:      # else they wait for a step that reaches the runner
            out.finished_request_ids, self._finished_ids = self._split_finished_ids()
        return out

    def _split_finished_ids(self) -> tuple[list[str], list[str]]:
        """(finished requests the runner may forget now, those to hold back): an aborted
        request still in a step in flight keeps its runner state until that step is done."""
        if not self._finished_ids or not self._in_flight:
            return self._finished_ids, []
        busy = {seq.request_id for seq in self._in_flight.values()}
        return ([rid for rid in self._finished_ids if rid not in busy],
                [rid for rid in self._finished_ids if rid in busy])

    @staticmethod
    def _scheduled_seq(seq: Sequence, n: int, lookahead: int, drafts) -> ScheduledSeq:
        # Runs per sequence per step: plain attribute reads, positional arguments.
        group, tokens, start = seq.group, seq.token_ids, seq.num_computed_tokens
        samples, output_ids = 0, None
        if start + n == len(tokens):
            samples = 1 if group.forked else group.n
            if group.sampling_params.has_penalties:
                output_ids = tokens[seq.prompt_len:]
        fed = tokens[start:start + n]
        if drafts:
            fed.extend(drafts)
        return ScheduledSeq(group.request_id, seq.seq_id, fed, start, seq.block_table.copy(),
                            samples, len(tokens) - seq.prompt_len, output_ids, lookahead, len(drafts))

    # -- after the step -------------------------------------------------------------------
    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Sequence]:
        """Apply the results of the last schedule()'s step; returns the sequences that
        got new tokens (forked children included), for output processing. Finished ones
        are already freed."""
        if result.seq_ids != [s.seq_id for s in out.scheduled]:
            raise ValueError("RunnerOutput.seq_ids do not match the SchedulerOutput's sequences")
        live = [self._live_seq(s) for s in out.scheduled]
        commit = self.block_manager.commit_computed
        now = time.time()
        appended: list[Sequence] = []
        for s, seq, sampled in zip(out.scheduled, live, result.sampled):
            if seq is None:
                continue
            n = len(s.token_ids)
            if s.num_lookahead:           # settled once its accepted tokens are known
                self.num_decode_tokens_computed += n
                self._settle_speculative(seq, s, sampled, now)
                appended.append(seq)
                continue
            if n > 1 or s.num_output_tokens == 0:
                self.num_prefill_tokens_computed += n
            else:
                self.num_decode_tokens_computed += n
            seq.num_computed_tokens += n
            seq.num_tokens_fed += n
            commit(seq)
        for s, seq, sampled in zip(out.scheduled, live, result.sampled):
            if seq is None or not sampled or s.num_lookahead:
                continue
            if not seq.group.forked:
                appended.extend(self._fork(seq, sampled, now))
            else:
                self._append(seq, sampled, now)
                appended.append(seq)
        return appended

    def _settle_speculative(self, seq: Sequence, s: ScheduledSeq, sampled: list[SampledToken],
                            now: float) -> None:
        """seq fed [last, x_1..x_d] and got back its accepted drafts + one token (1..d+1):
        append them (up to a stop), roll back the KV of the rejected drafts, free the
        lookahead blocks no longer needed, offer the newly full blocks to the prefix cache."""
        fed, num_drafts = len(s.token_ids), s.num_draft_tokens
        if not 1 <= len(sampled) <= num_drafts + 1:
            raise ValueError(f"sequence {seq.seq_id}: {len(sampled)} tokens back for "
                             f"{num_drafts} drafts (expected 1..{num_drafts + 1})")
        seq.num_computed_tokens += fed
        seq.num_tokens_fed += fed
        if num_drafts:
            self.num_spec_verifications += 1
            self.num_spec_draft_tokens += num_drafts
            self.num_spec_accepted_tokens += len(sampled) - 1
            seq.num_spec_draft_tokens += num_drafts
            seq.num_spec_accepted_tokens += len(sampled) - 1
        self._append(seq, sampled, now)
        if seq.status.is_finished:        # freed already
            return
        self.rollback(seq, fed - len(sampled))
        self.block_manager.trim(seq)
        self.block_manager.commit_computed(seq)

    def _live_seq(self, s: ScheduledSeq) -> Optional[Sequence]:
        seq = self._in_flight.pop(s.seq_id, None)     # the step is done: no longer in flight
        if seq is None or seq.status.is_finished:
            return None           # not scheduled by this scheduler, or aborted since
        return seq

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Forget the KV of seq's last num_tokens computed tokens: the next time seq runs,
        they are fed again (speculative decoding: the rejected draft tokens' KV; the caller
        replaces those token ids first). Only tokens in blocks seq alone holds and that
        are not in the prefix cache can be rolled back (others' KV must not change)."""
        if not 0 <= num_tokens <= seq.num_computed_tokens:
            raise ValueError(f"rollback num_tokens must be in [0, {seq.num_computed_tokens}], "
                             f"got {num_tokens}")
        new_computed = seq.num_computed_tokens - num_tokens
        if not self.block_manager.is_private_from(seq, new_computed):
            raise ValueError(f"sequence {seq.seq_id}: tokens from position {new_computed} on "
                             f"share KV blocks (prefix cache or forks) and cannot be rolled back")
        seq.num_computed_tokens = new_computed

    def _append(self, seq: Sequence, sampled: list[SampledToken], now: float) -> None:
        """Advance seq by the sampled tokens, in order, up to the first that stops it. A
        constrained seq's grammar advances with them; its termination (the grammar took
        its stop token) finishes seq with "stop"."""
        want_logprobs = seq.group.sampling_params.logprobs is not None
        grammar = seq.grammar
        for tok in sampled:
            if grammar is not None and not grammar.accept_token(tok.token_id):
                self._refused_by_grammar(seq, tok.token_id)
                return
            seq.append_token(tok.token_id, now)
            if want_logprobs:
                seq.logprobs = seq.logprobs or []
                seq.logprobs.append(tok.top_logprobs or {})
                seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + (tok.logprob or 0.0)
            if self._check_stop(seq):
                return
            if grammar is not None and grammar.is_terminated:
                self.finish(seq, SequenceStatus.FINISHED_STOPPED)
                return

    def _refused_by_grammar(self, seq: Sequence, token_id: int) -> None:
        """The sampler gave a token the bitmask forbids: only when every allowed token was
        masked too (min_tokens banning the stop token a complete grammar asks for). A
        complete output stops there; anything else is a bug, and the request is aborted
        rather than given output that breaks its grammar."""
        if seq.grammar.is_completed:
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            return
        logger.error("request %r: sampled token %d is not allowed by its grammar; aborting it",
                     seq.request_id, token_id)
        self.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def _fork(self, parent: Sequence, sampled: list[SampledToken], now: float) -> list[Sequence]:
        """The prompt just completed: sample i goes to sequence i; samples 1.. are new
        sequences sharing the parent's prompt KV."""
        group = parent.group
        children = []
        for i, tok in enumerate(sampled[1:], start=1):
            child = Sequence(group.prompt_token_ids, group, i)
            child.token_ids = list(parent.token_ids)
            if parent.grammar is not None:    # before the parent's first token moves it
                child.grammar = parent.grammar.fork()
            self._append(child, [tok], now)
            children.append(child)
        group.seqs.extend(children)
        group.forked = True
        for child in children:            # before the parent's stop check can free its KV
            if not child.status.is_finished:
                self._place_child(parent, child)
        self._append(parent, sampled[:1], now)
        return [parent] + children

    def _place_child(self, parent: Sequence, child: Sequence) -> None:
        """Start sample `child` (its first token already appended) from the parent's KV, or
        queue it for recompute when no block or running slot is free."""
        if len(self.running) < self.config.max_num_seqs and self.block_manager.fork(parent, child):
            self._insert_running(child)
            return
        child.block_hashes = list(parent.block_hashes)
        self._insert_waiting(child)

    def _check_stop(self, seq: Sequence) -> bool:
        """vLLM's order: min_tokens, stop token ids / eos, then length (stop strings are
        the output processor's: stop_at_string). True when seq finished."""
        params = seq.group.sampling_params
        tokens = seq.token_ids
        last, num_output = tokens[-1], len(tokens) - seq.prompt_len
        if num_output >= params.min_tokens and last in params.all_stop_token_ids:
            # vLLM: stop_reason is the id for stop_token_ids, None for eos.
            seq.stop_reason = last if last in params.stop_token_ids else None
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            return True
        if num_output >= self.max_new_tokens(seq.group) or len(tokens) >= self.config.max_model_len:
            self.finish(seq, SequenceStatus.FINISHED_LENGTH)
            return True
        return False

    def stop_at_string(self, seq: Sequence, stop: str) -> None:
        """seq's text reached stop string `stop` (found by the output processor). A stop
        string wins over the length limit its last token also reached."""
        seq.stop_reason = stop
        if seq.status.is_finished:
            seq.status = SequenceStatus.FINISHED_STOPPED
        else:
            self.finish(seq, SequenceStatus.FINISHED_STOPPED)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self._remove(seq)
        self.block_manager.free(seq)
        seq.status = status

    def abort(self, request_id: str) -> Optional[SequenceGroup]:
        group = self.groups.get(request_id)
        if group is None:
            return None
        for seq in group.seqs:
            if not seq.status.is_finished:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self.retire(group)
        return group

    def retire(self, group: SequenceGroup) -> None:
        """Forget a finished request; the runner drops its state with the next step."""
        self.groups.pop(group.request_id, None)
        if group.request_id in self._runner_requests:
            self._runner_requests.discard(group.request_id)
            self._finished_ids.append(group.request_id)

    def forget_in_flight(self, out: SchedulerOutput) -> None:
        """A step that will never be update()d (it failed): its sequences are no longer in flight."""
        for s in out.scheduled:
            self._in_flight.pop(s.seq_id, None)

    def failed_step_requests(self, out: SchedulerOutput, cache_ops_failed: bool) -> list[str]:
        """The requests a failed step leaves in an unknown state: the scheduled ones; when
        execute() failed (block moves maybe half done), also those whose KV a block move
        of this step was to fill."""
        ids = {s.request_id for s in out.scheduled}
        if cache_ops_failed:
            # Swapped out in this step: the copy to CPU may not have happened.
            swapped_to = {cpu for _, cpu in out.blocks_to_swap_out}
            ids.update(seq.request_id for seq in self.swapped
                       if swapped_to.intersection(seq.swapped_kv))
            # A forked child's last block is a copy made in this step; the child may not
            # be scheduled this step, and would run on with a garbage block.
            copied_to = {dst for _, dst in out.blocks_to_copy}
            if copied_to:
                for group in self.groups.values():
                    if any(copied_to.intersection(seq.block_table) for seq in group.seqs
                           if not seq.status.is_finished):
                        ids.add(group.request_id)
        return sorted(ids)
