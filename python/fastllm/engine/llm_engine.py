"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    engine = LLMEngine.from_pretrained(path, EngineConfig(...), dtype="auto", device="auto")
    engine.add_request("r0", "Hello", SamplingParams(max_tokens=16))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

step() = Scheduler.schedule() -> SchedulerOutput -> ModelRunner.execute() (block moves,
forward, sample) -> RunnerOutput -> Scheduler.update() (computed tokens, appended
samples, n > 1 forks, stop tokens and lengths, freeing) -> OutputProcessor (detokenize,
stop strings, RequestOutputs as each request's SamplingParams.output_kind asks:
CUMULATIVE, DELTA -- delta=True in add_request -- or FINAL_ONLY). See docs/architecture.md.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Optional, Union

import torch

from fastllm.config import EngineConfig, ParallelConfig
from fastllm.distributed.executor import Executor, UniprocExecutor
from fastllm.distributed.launch import is_parallel_launch
from fastllm.engine.block_manager import BlockManager
from fastllm.engine.model_runner import ModelRunner
from fastllm.engine.output_processor import OutputProcessor
from fastllm.engine.pipelined_step import pipelined_step
from fastllm.engine.scheduler import Scheduler
from fastllm.engine.sequence import SequenceGroup
from fastllm.engine.stats import EngineStats, request_latency
from fastllm.engine.step_data import RunnerOutput, SchedulerOutput
from fastllm.outputs import RequestOutput
from fastllm.profiling import nvtx_range
from fastllm.sampling_params import RequestOutputKind, SamplingParams
from fastllm.spec_decode.draft import DraftProposer, load_draft
from fastllm.spec_decode.planner import SpecPlanner
from fastllm.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

_MAX_LATENCY_RECORDS = 10_000


def engine_vocab_size(model_config, tokenizer) -> int:
    """Ids a request may hold or be sampled: an embedding padded past the tokenizer
    (Qwen2.5) has rows no token names; they are never sampled and refused in prompts."""
    vocab_size = model_config.vocab_size
    tokenizer_size = getattr(tokenizer, "vocab_size", None)    # None: it knows every id
    if isinstance(tokenizer_size, int):
        vocab_size = min(vocab_size, tokenizer_size)
    return vocab_size


class LLMEngine:
    def __init__(self, model, model_config, engine_config: EngineConfig, tokenizer=None, *,
                 device: torch.device, dtype: torch.dtype, executor: Optional[Executor] = None):
        """executor: the runner(s) to drive (a MultiprocExecutor for tensor / pipeline
        parallelism, see from_pretrained); None = a ModelRunner on `model` in this process."""
        self.model_config = model_config
        self.config = engine_config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        engine_config.resolve_max_model_len(model_config)
        # The tokenizer is the only source of the ids that end generation.
        self.eos_token_ids = list(tokenizer.eos_token_ids) if tokenizer is not None else []
        self.vocab_size = engine_vocab_size(model_config, tokenizer)
        if executor is None:
            executor = UniprocExecutor(ModelRunner(model, model_config, engine_config,
                                                   device=self.device, dtype=dtype,
                                                   valid_vocab_size=self.vocab_size))
        self.executor = executor
        self.runner = executor.runner           # the driver's runner (stats, tests)
        # Unseeded random sampling draws from here. Seeded after the runner: its KV
        # profile and graph capture draw random numbers, as many as the config asks for.
        torch.manual_seed(engine_config.seed)
        self.block_manager = BlockManager(executor.num_kv_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching,
                                          num_swap_blocks=executor.num_swap_blocks)
        # Grammars of constrained requests (compiled in its thread pool; xgrammar is
        # loaded only when the first one arrives).
        self.structured = (StructuredOutputManager(tokenizer, model_config.vocab_size)
                           if tokenizer is not None else None)
        self.drafter = None
        spec = engine_config.speculative_config
        if spec is not None and spec.method == "draft_model":
            self.drafter = self._make_drafter(spec)
        self.scheduler = Scheduler(engine_config, self.block_manager,
                                   structured_output_manager=self.structured,
                                   spec_planner=SpecPlanner(spec) if spec is not None else None)
        self.output_processor = OutputProcessor(tokenizer)
        self.num_steps = 0
        # Pipeline microbatches: the steps submitted to the executor, not yet collected.
        self._batch_queue: Optional[collections.deque] = (
            collections.deque() if executor.max_concurrent_batches > 1 else None)
        self.finished_latencies: collections.deque = collections.deque(maxlen=_MAX_LATENCY_RECORDS)

    def close(self) -> None:
        """Release the runner's page-locked swap space now rather than at garbage
        collection, and shut down the parallel workers. Swapped-out requests go back to
        the waiting queue to be recomputed, and the engine cannot swap afterwards
        (preemption falls back to recompute); idempotent."""
        self._drain_batch_queue()
        self.scheduler.stop_swapping()
        self.executor.close()
        if self.structured is not None:
            self.structured.close()
        if self.drafter is not None:
            self.drafter.close()

    def _make_drafter(self, spec) -> DraftProposer:
        """The draft model (same vocabulary) and its mirror of the target's KV blocks, on
        the driver."""
        model, config = load_draft(spec.model, self.model_config, device=self.device, dtype=self.dtype)
        return DraftProposer(model, config, self.config, num_blocks=self.executor.num_kv_blocks,
                             num_swap_blocks=self.executor.num_swap_blocks, device=self.device,
                             dtype=self.dtype, valid_vocab_size=self.vocab_size)

    @property
    def is_healthy(self) -> bool:
        """False once a parallel worker died or hung: every later step fails."""
        return self.executor.is_alive

    @classmethod
    def from_pretrained(cls, model: str, engine_config: Optional[EngineConfig] = None,
                        dtype="auto", device="auto", tokenizer=None,
                        quantization="auto",
                        parallel_config: Optional[ParallelConfig] = None) -> "LLMEngine":
        """Load `model` (HF directory or .gguf file) and its tokenizer. quantization:
        'auto' keeps a GGUF's linear weights in their blocks, None dequantizes them.
        parallel_config: tensor / pipeline parallel sizes; world_size > 1 (or a torchrun
        launch) runs the model on that many ranks (fastllm.distributed.executor)."""
        from fastllm.model.loader import load_for_engine
        engine_config = engine_config or EngineConfig()
        parallel_config = parallel_config or ParallelConfig()
        if is_parallel_launch(parallel_config):
            return cls._from_pretrained_parallel(model, engine_config, dtype, device, tokenizer,
                                                 quantization, parallel_config)
        loaded = load_for_engine(model, dtype=dtype, device=device, quantization=quantization)
        if tokenizer is None:
            from fastllm.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(model)
        return cls(loaded.model, loaded.config, engine_config, tokenizer,
                   device=loaded.device, dtype=loaded.dtype)

    @classmethod
    def _from_pretrained_parallel(cls, model, engine_config, dtype, device, tokenizer,
                                  quantization, parallel_config) -> "LLMEngine":
        """The driver's engine over a MultiprocExecutor; on a torchrun rank other than 0
        this runs the worker loop and exits (SystemExit(0)) when the driver shuts down."""
        from fastllm.distributed.executor import MultiprocExecutor
        from fastllm.distributed.model_config import read_model_config
        from fastllm.distributed.sharding import validate_parallel
        from fastllm.distributed.worker import WorkerSpec
        model_config = read_model_config(model)
        validate_parallel(model_config, parallel_config)      # before any worker starts
        if tokenizer is None:
            from fastllm.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_pretrained(model)
        spec = WorkerSpec(model, dtype, str(device), quantization, engine_config, parallel_config,
                          engine_vocab_size(model_config, tokenizer))
        executor = MultiprocExecutor.start(spec)
        try:
            return cls(executor.runner.model, executor.rank.model_config, engine_config, tokenizer,
                       device=executor.rank.device, dtype=executor.rank.dtype, executor=executor)
        except BaseException:
            executor.close()
            raise

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
        vocab = self.vocab_size
        for t in prompt_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"request {request_id!r}: prompt token id {t!r} is not an integer "
                                 f"in [0, {vocab}) (the ids the model and its tokenizer know)")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"request {request_id!r}: SamplingParams.logprobs={params.logprobs} is "
                             f"more than max_logprobs={self.config.max_logprobs} (EngineConfig)")
        bad_stops = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stops:
            raise ValueError(f"request {request_id!r}: SamplingParams.stop_token_ids {bad_stops[:5]} "
                             f"are not in [0, {vocab}) (the ids the model and its tokenizer know)")
        structured = None
        if params.structured_outputs is not None:
            if self.structured is None:
                raise ValueError(f"request {request_id!r}: structured_outputs need the model's "
                                 f"tokenizer, and this engine has none")
            structured = self.structured.submit(params.structured_outputs)   # ValueError if invalid
        params = params.clone()
        params.update_from_tokenizer(self.eos_token_ids)
        if delta:
            params.output_kind = RequestOutputKind.DELTA
        group = SequenceGroup(str(request_id), text, prompt_token_ids, params, arrival_time)
        group.structured_request = structured
        self.scheduler.add(group)

    def abort_request(self, request_id: Union[str, list[str]]) -> None:
        """One id or an iterable of them; an id is anything add_request took (str() of it)."""
        is_many = isinstance(request_id, (list, tuple, set, frozenset))
        ids = list(request_id) if is_many else [request_id]
        for rid in ids:
            group = self.scheduler.abort(str(rid))
            if group is not None:
                group.finish_time = time.time()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._batch_queue)

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.groups)

    def get_unfinished_request_ids(self) -> set[str]:
        """Ids of the requests still in flight: what a caller checks after a failed step()
        to learn which of its requests that step aborted."""
        return set(self.scheduler.groups)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._batch_queue is not None:
            return pipelined_step(self, self._batch_queue)
        with nvtx_range("schedule"):
            sched = self.scheduler.schedule()
        failed = self._grammar_failure_outputs()
        if sched.is_empty:
            if self.structured is not None and self.structured.has_pending:
                self.structured.wait_for_pending(timeout=0.05)   # only grammars still compiling
            return failed
        # A failed step drops its requests (their KV or token state is unknown) so the
        # engine stays usable for the others, then lets the caller see the error.
        try:
            if self.drafter is not None:      # on the driver: drafts into the plain data
                with nvtx_range("propose"):
                    self.drafter.propose(sched)
            result = self.executor.execute(sched)
        except BaseException:
            self._abort_failed_step(sched, cache_ops_failed=True)
            raise
        if not sched.scheduled:          # only block moves this step
            return failed
        try:
            with nvtx_range("update"):
                return failed + self._update(sched, result)
        except BaseException:
            self._abort_failed_step(sched, cache_ops_failed=False)
            raise

    def _grammar_failure_outputs(self) -> list[RequestOutput]:
        """Final outputs of the requests the scheduler aborted for a grammar that failed to
        compile (already retired there)."""
        groups = self.scheduler.take_grammar_failures()
        if not groups:
            return []
        return self.output_processor.make_outputs(groups)[0]

    def _abort_failed_step(self, sched: SchedulerOutput, cache_ops_failed: bool) -> None:
        self.scheduler.forget_in_flight(sched)
        ids = self.scheduler.failed_step_requests(sched, cache_ops_failed)
        if ids:
            logger.error("step failed: aborting requests %s", ids)
            self.abort_request(ids)
        if not self.executor.is_alive:      # no later step can run: fail them all
            for queued in self._batch_queue or ():
                self.scheduler.forget_in_flight(queued)
            if self._batch_queue:
                self._batch_queue.clear()
            self.abort_request(list(self.scheduler.groups))

    def _drain_batch_queue(self) -> None:
        """Collect the steps still in flight (closing), so no rank is left mid-step."""
        while self._batch_queue and self.executor.is_alive:
            sched = self._batch_queue.popleft()
            try:
                result = self.executor.collect(sched)
                if sched.scheduled:
                    self.scheduler.update(sched, result)
            except Exception:  # noqa: BLE001 -- closing: the group is shut down anyway
                logger.exception("a step in flight failed while closing")
                break

    def _update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Scheduler bookkeeping, then text and stop strings, then the outputs."""
        seqs = self.scheduler.update(sched, result)
        self.num_steps += 1
        for seq, stop in self.output_processor.detokenize(seqs):
            self.scheduler.stop_at_string(seq, stop)
        groups = {seq.group.request_id: seq.group for seq in seqs}.values()
        outputs, finished = self.output_processor.make_outputs(groups)
        for group in finished:
            self.scheduler.retire(group)
            self.finished_latencies.append(request_latency(group))
        return outputs

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
            num_steps=self.num_steps, requests=list(self.finished_latencies),
            spec_num_draft_tokens=sch.num_spec_draft_tokens,
            spec_num_accepted_tokens=sch.num_spec_accepted_tokens,
            spec_num_verifications=sch.num_spec_verifications)

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()
