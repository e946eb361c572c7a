"""From sampled tokens to RequestOutputs: detokenization, stop strings, output building.

After Scheduler.update has appended a step's tokens (and finished the sequences that hit
a stop token or their length), the engine hands the sequences that grew to
    stops = processor.detokenize(seqs)    # feed each its incremental detokenizer; stop strings
then tells the scheduler about each (seq, stop string) hit, and builds
    outputs, finished = processor.make_outputs(groups)   # as each output_kind asks
CUMULATIVE: everything so far, every step the request produced something; DELTA: only the
new part (streaming); FINAL_ONLY: once, when it finishes. A running sequence's last
characters may be the start of a stop string that a later token completes (and that is
then cut), so they are held back until then (SamplingParams.output_text_buffer_length).

The text fields it writes (Sequence.output_text / detokenizer, SequenceGroup.num_returned_*)
are the output processor's own; the scheduler never reads them.
"""
from __future__ import annotations

import time
from typing import Iterable

from fastllm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from fastllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastllm.sampling_params import RequestOutputKind
from fastllm.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer      # None: token ids only, no text and no stop strings

    def detokenize(self, seqs: Iterable[Sequence]) -> list[tuple[Sequence, str]]:
        """Extend each sequence's output_text by its new tokens; the (seq, stop string)
        of those whose text now holds a stop string (the text is already cut there)."""
        stops = []
        if self.tokenizer is None:        # no text: nothing to decode, no stop string to find
            return stops
        for seq in seqs:
            params = seq.params
            # A stop token's own text is left out (eos is special and skipped anyway).
            stopped_by_token = (seq.status is SequenceStatus.FINISHED_STOPPED
                                and not isinstance(seq.stop_reason, str))
            num_new_chars = self._decode_new(seq, add_last=not stopped_by_token)
            if not stopped_by_token and params.stop and seq.num_output_tokens >= params.min_tokens:
                hit = find_stop_string(seq.output_text, num_new_chars, params.stop,
                                       params.include_stop_str_in_output)
                if hit is not None:
                    stop, keep = hit
                    seq.output_text = seq.output_text[:keep]
                    stops.append((seq, stop))
                    continue
            if seq.status.is_finished and seq.detokenizer is not None:
                seq.output_text += seq.detokenizer.flush()
        return stops

    def _decode_new(self, seq: Sequence, add_last: bool) -> int:
        """Feed the sequence's not yet decoded output tokens to its incremental
        detokenizer and extend seq.output_text; returns the number of new characters."""
        if self.tokenizer is None:
            return 0
        if seq.detokenizer is None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.group.prompt_token_ids,
                                                     seq.params.skip_special_tokens)
        detok = seq.detokenizer
        # Counters, not list copies: this runs for every sampled token.
        start = seq.prompt_len + len(detok.token_ids) - detok.num_context_tokens
        end = seq.num_tokens if add_last else seq.num_tokens - 1
        if start >= end:
            return 0
        new = detok.add(seq.token_ids[start:end])
        seq.output_text += new
        return len(new)

    def make_outputs(self, groups: Iterable[SequenceGroup]) -> tuple[list[RequestOutput], list[SequenceGroup]]:
        """A RequestOutput per group whose output_kind asks for one this step, and the
        groups that finished (their finish_time set now)."""
        now = time.time()
        outputs, finished = [], []
        for group in groups:
            done = group.is_finished
            if done:
                group.finish_time = now
                finished.append(group)
            if done or group.sampling_params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self.make_output(group))
        return outputs, finished

    def make_output(self, group: SequenceGroup) -> RequestOutput:
        completions = [self._completion(group, seq)
                       for seq in sorted(group.seqs, key=lambda s: s.index)]
        metrics = RequestMetrics(
            arrival_time=group.arrival_time, first_scheduled_time=group.first_scheduled_time,
            first_token_time=group.first_token_time,
            last_token_time=max((s.token_times[-1] for s in group.seqs if s.token_times), default=None),
            finished_time=group.finish_time or (time.time() if group.is_finished else None),
            num_preemptions=sum(s.num_preemptions for s in group.seqs),
            num_cached_tokens=group.seqs[0].num_cached_tokens,
            num_spec_draft_tokens=sum(s.num_spec_draft_tokens for s in group.seqs),
            num_spec_accepted_tokens=sum(s.num_spec_accepted_tokens for s in group.seqs))
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=list(group.prompt_token_ids), outputs=completions,
                             finished=group.is_finished, metrics=metrics)

    @staticmethod
    def _completion(group: SequenceGroup, seq: Sequence) -> CompletionOutput:
        params = group.sampling_params
        num_chars = len(seq.output_text)
        if not seq.status.is_finished:       # hold back a possible stop string's start
            num_chars = max(0, num_chars - params.output_text_buffer_length)
        t0 = c0 = 0
        if params.output_kind is RequestOutputKind.DELTA:
            t0, c0 = group.num_returned_tokens[seq.index], group.num_returned_chars[seq.index]
            num_chars = max(num_chars, c0)
            group.num_returned_tokens[seq.index] = seq.num_output_tokens
            group.num_returned_chars[seq.index] = num_chars
        logprobs = seq.logprobs[t0:] if seq.logprobs is not None else None
        return CompletionOutput(
            index=seq.index, text=seq.output_text[c0:num_chars],
            token_ids=seq.token_ids[seq.prompt_len + t0:],
            cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
            finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason)
