"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine = LLMEngine.from_pretrained(path, EngineConfig(...), dtype="auto", device="auto")
    engine.add_request("r0", "Hello", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

step() = Scheduler.schedule() -> ModelRunner.execute() (block moves, forward, sample)
-> mark computed -> append the sampled tokens, fork n > 1 samples, detokenize, check
stops -> RequestOutputs, as each request's SamplingParams.output_kind asks: CUMULATIVE
(everything so far, every step it produced something), DELTA (only the new part, for
streaming; delta=True in add_request) or FINAL_ONLY (once, when it finishes).
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Optional, Union

import torch

from fastllm.config import EngineConfig
from fastllm.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string
from fastllm.engine.block_manager import BlockManager
from fastllm.engine.model_runner import ModelRunner, SampledToken
from fastllm.engine.scheduler import Scheduler
from fastllm.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from fastllm.engine.stats import EngineStats, request_latency
# resolve_device / resolve_dtype live in the loader; re-exported for existing callers.
from fastllm.model.loader import resolve_device, resolve_dtype  # noqa: F401
from fastllm.model.sampler import make_generator
from fastllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastllm.profiling import nvtx_range
from fastllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_MAX_LATENCY_RECORDS = 10_000


class LLMEngine:
    def __init__(self, model, model_config, engine_config: EngineConfig, tokenizer=None, *,
                 device: torch.device, dtype: torch.dtype):
        self.model_config = model_config
        self.config = engine_config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        engine_config.resolve_max_model_len(model_config)
        # The tokenizer is the only source of the ids that end generation.
        self.eos_token_ids = list(tokenizer.eos_token_ids) if tokenizer is not None else []
        self.runner = ModelRunner(model, model_config, engine_config, device=self.device,
                                  dtype=dtype)
        # Unseeded random sampling draws from here. Seeded after the runner: its KV
        # profile and graph capture draw random numbers, as many as the config asks for.
        torch.manual_seed(engine_config.seed)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching)
        self.scheduler = Scheduler(engine_config, self.block_manager,
                                   num_swap_blocks=self.runner.num_swap_blocks)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.finished_latencies: collections.deque = collections.deque(maxlen=_MAX_LATENCY_RECORDS)

    def close(self) -> None:
        """Release the runner's page-locked swap space now rather than at garbage
        collection. The engine cannot swap afterwards (preemption falls back to
        recompute); idempotent."""
        self.runner.close()
        self.scheduler.free_swap_blocks.clear()
        self.scheduler.num_swap_blocks = 0

    @classmethod
    def from_pretrained(cls, model: str, engine_config: Optional[EngineConfig] = None,
                        dtype="auto", device="auto", tokenizer=None,
                        quantization="auto") -> "LLMEngine":
        """Load `model` (HF directory or .gguf file) and its tokenizer. quantization:
        'auto' keeps a GGUF's linear weights in their blocks, None dequantizes them."""
        from fastllm.model.loader import load_for_engine
        engine_config = engine_config or EngineConfig()
        loaded = load_for_engine(model, dtype=dtype, device=device, quantization=quantization)
        if tokenizer is None:
            from fastllm.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(model)
        return cls(loaded.model, loaded.config, engine_config, tokenizer,
                   device=loaded.device, dtype=loaded.dtype)

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, list[int], None],
                    sampling_params: Optional[SamplingParams] = None, *,
                    prompt_token_ids: Optional[list[int]] = None,
                    arrival_time: Optional[float] = None, delta: bool = False) -> None:
        """Queue a request. `prompt` is text (needs a tokenizer) or a list of token ids.
        delta=True: shorthand for output_kind=RequestOutputKind.DELTA (only the text/tokens
        new since the last output).
        Raises ValueError for a request that could never run (too long, bigger than the cache)."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        text = None
        if prompt_token_ids is None:
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("prompt is text but the engine has no tokenizer; pass token ids")
                text = prompt
                prompt_token_ids = self.tokenizer.encode(prompt)
            elif isinstance(prompt, (list, tuple)):
                prompt_token_ids = list(prompt)
            else:
                raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        else:
            text = prompt if isinstance(prompt, str) else None
        vocab = self.model_config.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"request {request_id!r}: prompt token id {t!r} is not an integer "
                                 f"in [0, {vocab}) (the model's vocab_size)")
        params = params.clone()
        params.update_from_tokenizer(self.eos_token_ids)
        if delta:
            params.output_kind = RequestOutputKind.DELTA
        group = SequenceGroup(str(request_id), text, prompt_token_ids, params, arrival_time)
        group.generator = make_generator(params, self.device)
        self.scheduler.add(group)

    def abort_request(self, request_id: Union[str, list[str]]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            group = self.scheduler.abort(str(rid))
            if group is not None:
                group.finish_time = time.time()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.groups)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with nvtx_range("schedule"):
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        for s in sched.scheduled:
            if s.seq.group.first_scheduled_time is None:
                s.seq.group.first_scheduled_time = now
        # A failed step drops its requests (their KV or token state is unknown) so the
        # engine stays usable for the others, then lets the caller see the error.
        try:
            results = self.runner.execute(sched)
        except BaseException:
            self._abort_step(sched, cache_ops_failed=True)
            raise
        if not sched.scheduled:          # only block moves this step
            return []
        try:
            with nvtx_range("update"):
                return self._update(sched, results)
        except BaseException:
            self._abort_step(sched, cache_ops_failed=False)
            raise

    def _abort_step(self, sched, cache_ops_failed: bool) -> None:
        """Abort the step's scheduled requests; when execute() failed (block moves maybe
        half done), also those whose KV a block move of this step was to fill."""
        ids = {s.seq.request_id for s in sched.scheduled}
        if cache_ops_failed:
            # Swapped out in this step: the copy to CPU may not have happened.
            ids.update(seq.request_id for seq in sched.preempted
                       if seq.status is SequenceStatus.SWAPPED)
            # A forked child's last block is a copy made in this step; the child may not
            # be scheduled this step, and would run on with a garbage block.
            copied_to = {dst for _, dst in sched.blocks_to_copy}
            if copied_to:
                for group in self.scheduler.groups.values():
                    if any(copied_to.intersection(seq.block_table) for seq in group.seqs
                           if not seq.status.is_finished):
                        ids.add(group.request_id)
        if ids:
            logger.error("step failed: aborting requests %s", sorted(ids))
            self.abort_request(sorted(ids))

    def _update(self, sched, results) -> list[RequestOutput]:
        self.scheduler.mark_computed(sched)
        self.num_steps += 1
        now = time.time()
        touched: dict[str, SequenceGroup] = {}
        for s, sampled in zip(sched.scheduled, results):
            if not sampled:
                continue
            seq = s.seq
            group = seq.group
            touched[group.request_id] = group
            new_seqs = [seq]
            if not group.forked:
                new_seqs = self._fork(seq, sampled, now)
            else:
                self._append(seq, sampled[0], now)
            for each in new_seqs:
                self._check_stop(each)
        outputs = []
        for group in touched.values():
            finished = group.is_finished
            if finished or group.sampling_params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outputs.append(self._make_output(group))
            if finished:
                group.finish_time = now
                self.scheduler.retire(group)
                self.finished_latencies.append(request_latency(group))
        return outputs

    def _append(self, seq: Sequence, tok: SampledToken, now: float) -> None:
        seq.append_token(tok.token_id, now)
        self.num_generated_tokens += 1
        if seq.params.logprobs is not None:
            seq.logprobs = seq.logprobs or []
            seq.logprobs.append(tok.top_logprobs or {})
            seq.cumulative_logprob = (seq.cumulative_logprob or 0.0) + (tok.logprob or 0.0)

    def _fork(self, parent: Sequence, sampled: list[SampledToken], now: float) -> list[Sequence]:
        """The prompt just completed: sample i goes to sequence i; samples 1.. are new
        sequences sharing the parent's prompt KV (BlockManager.fork)."""
        group = parent.group
        children = []
        for i, tok in enumerate(sampled[1:], start=1):
            child = Sequence(group.prompt_token_ids, group, i)
            child.token_ids = list(parent.token_ids)
            self._append(child, tok, now)
            children.append(child)
        self._append(parent, sampled[0], now)
        group.seqs.extend(children)
        group.forked = True
        for child in children:
            self.scheduler.fork(parent, child)
        return [parent] + children

    # -- stopping and text ---------------------------------------------------------------
    def _check_stop(self, seq: Sequence) -> None:
        """vLLM's order: min_tokens, stop token ids / eos, stop strings, length."""
        params = seq.params
        last = seq.token_ids[-1]
        status, reason = None, None
        stop_token = (seq.num_output_tokens >= params.min_tokens
                      and last in params.all_stop_token_ids)
        if stop_token:
            status = SequenceStatus.FINISHED_STOPPED
            # vLLM: stop_reason is the id for stop_token_ids, None for eos.
            reason = last if last in params.stop_token_ids else None
        # A stop token's own text is left out (eos is special and skipped anyway).
        num_new_chars = self._detokenize(seq, add_last=not stop_token)
        if status is None and params.stop and seq.num_output_tokens >= params.min_tokens:
            hit = find_stop_string(seq.output_text, num_new_chars, params.stop,
                                   params.include_stop_str_in_output)
            if hit is not None:
                reason, keep = hit
                seq.output_text = seq.output_text[:keep]
                status = SequenceStatus.FINISHED_STOPPED
        if status is None:
            max_tokens = self.scheduler.max_new_tokens(seq.group)
            if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.config.max_model_len:
                status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            if not isinstance(reason, str) and seq.detokenizer is not None:
                seq.output_text += seq.detokenizer.flush()
            seq.stop_reason = reason
            self.scheduler.finish(seq, status)

    def _detokenize(self, seq: Sequence, add_last: bool) -> int:
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

    # -- outputs -------------------------------------------------------------------------
    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        completions = []
        params = group.sampling_params
        for seq in sorted(group.seqs, key=lambda s: s.index):
            # A running sequence's last characters may be the start of a stop string that
            # a later token completes (and that is then cut): hold them back until then.
            num_chars = len(seq.output_text)
            if not seq.status.is_finished:
                num_chars = max(0, num_chars - params.output_text_buffer_length)
            t0 = c0 = 0
            if params.output_kind is RequestOutputKind.DELTA:
                t0, c0 = group.num_returned_tokens[seq.index], group.num_returned_chars[seq.index]
                num_chars = max(num_chars, c0)
                group.num_returned_tokens[seq.index] = seq.num_output_tokens
                group.num_returned_chars[seq.index] = num_chars
            token_ids = seq.token_ids[seq.prompt_len + t0:]
            text = seq.output_text[c0:num_chars]
            logprobs = seq.logprobs[t0:] if seq.logprobs is not None else None
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=token_ids,
                cumulative_logprob=seq.cumulative_logprob, logprobs=logprobs,
                finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason))
        metrics = RequestMetrics(
            arrival_time=group.arrival_time, first_scheduled_time=group.first_scheduled_time,
            first_token_time=group.first_token_time,
            last_token_time=max((s.token_times[-1] for s in group.seqs if s.token_times), default=None),
            finished_time=group.finish_time or (time.time() if group.is_finished else None),
            num_preemptions=sum(s.num_preemptions for s in group.seqs),
            num_cached_tokens=group.seqs[0].num_cached_tokens)
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=list(group.prompt_token_ids), outputs=completions,
                             finished=group.is_finished, metrics=metrics)

    # -- stats ---------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        sch, bm = self.scheduler, self.block_manager
        used = bm.num_used_blocks
        queried = bm.prefix_queried_tokens
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting), num_swapped=len(sch.swapped),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=used,
            kv_block_usage=used / bm.num_blocks,
            kv_slot_utilization=bm.slot_utilization(sch.running),
            prefix_cache_hit_rate=bm.prefix_hit_tokens / queried if queried else 0.0,
            num_preemptions=sch.num_preemptions, num_swaps_out=sch.num_swaps_out,
            num_prompt_tokens_computed=sch.num_prefill_tokens_computed,
            num_generation_tokens=sch.num_decode_tokens_computed,
            num_steps=self.num_steps, requests=list(self.finished_latencies))

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()
