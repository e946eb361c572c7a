"""ModelRunner.execute(SchedulerOutput) -> RunnerOutput: one step, plain data in and out.

Wiring only: the KV memory and block moves are fastllm.engine.kv_cache's, the packing of
inputs and of the sampling batch fastllm.engine.input_batch's, decode CUDA graphs
fastllm.engine.cuda_graphs', the sampling fastllm.model.sampler's. The runner never
changes a request: what it keeps per request (RequestStates: params, seeded generator,
the prompt on the device) is keyed by request id, learnt from the SchedulerOutput and
dropped on its finished ids, so the same runner can live in a worker process.

On a GPU, steps that feed one token per sequence (decodes) replay a CUDA graph captured
at start-up for the smallest batch-size bucket that fits; enforce_eager=True, the CPU,
or a failed capture keep every step eagerly.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fastllm.distributed.parallel_state import ParallelContext
from fastllm.distributed.sharding import local_model_config
from fastllm.engine import cuda_graphs, kv_cache
from fastllm.engine.pipeline import PendingStep, PipelineSteps
from fastllm.engine.input_batch import InputBatch, RequestStates, SamplingStep, sampled_tokens
from fastllm.engine.step_data import RunnerOutput, SampledToken, SchedulerOutput
from fastllm.model.layers import AttentionSpec
from fastllm.model.sampler import Sampler
from fastllm.profiling import nvtx_range
from fastllm.utils import cdiv

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model, model_config, engine_config, *,
                 device: torch.device, dtype: torch.dtype, valid_vocab_size: Optional[int] = None,
                 parallel: Optional[ParallelContext] = None):
        """parallel: this rank's TP/PP groups (the model was loaded with the same). Every
        rank of a replica runs execute() on the same SchedulerOutput; only the driver
        (rank 0) samples and returns tokens, the others an empty RunnerOutput."""
        self.model = model
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.parallel = parallel if parallel is not None else ParallelContext.single(self.device)
        self.pipeline = PipelineSteps(self.parallel)
        # This rank's heads and layers: what its KV cache and attention are sized for.
        p = self.parallel
        self.kv_config = local_model_config(model_config, p.tp.world_size, p.tp.rank,
                                            p.pp.world_size, p.pp.rank)
        # valid_vocab_size: the ids the tokenizer knows (< the embedding's rows when padded).
        self.sampler = Sampler(valid_vocab_size)
        self.inputs = InputBatch(self.device, engine_config.block_size, engine_config.max_num_seqs,
                                 model_config.vocab_size)
        self.requests = RequestStates(self.device)
        num_blocks, num_swap = self._agreed_num_blocks(
            engine_config.num_kv_blocks or self._auto_num_blocks())
        self.kv = kv_cache.KVCache(self.kv_config, engine_config, num_blocks, device=self.device,
                                   dtype=dtype, num_swap_blocks=num_swap)
        # Decode CUDA graphs, captured once the KV caches exist (they read and write them);
        # None = every step runs eagerly. Not with pipeline stages: a step's sends and
        # receives sit between the stages' forward passes.
        self.graph_runner = None if not self.graph_runner_allowed else cuda_graphs.build_decode_graphs(
            model, self.kv.kv_caches, self.kv_config, engine_config, self.device)

    @property
    def graph_runner_allowed(self) -> bool:
        """Decode CUDA graphs only without pipeline stages (see __init__)."""
        return self.parallel.pp.world_size == 1

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_swap_blocks(self) -> int:
        return self.kv.num_swap_blocks

    def close(self) -> None:
        """Release what outlives a plain garbage collection's order: the swap space's page
        locking. Idempotent; the runner can no longer swap afterwards."""
        kv = getattr(self, "kv", None)           # absent if __init__ failed early
        if kv is not None:
            kv.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finalizer (e.g. at exit)
            pass

    def _agreed_num_blocks(self, num_blocks: int) -> tuple[int, int]:
        """(KV blocks, swap blocks) the smallest rank of the replica can hold: the driver's
        BlockManager hands out ids every rank's cache must have."""
        per_block = kv_cache.kv_bytes_per_block(self.kv_config, self.config.block_size, self.dtype)
        num_swap = int(self.config.swap_space * (1 << 30)) // per_block
        if self.parallel.world_size == 1:
            return num_blocks, num_swap
        counts = torch.tensor([[num_blocks, num_swap]], dtype=torch.int64, device=self.parallel.tp.device)
        for comm in (self.parallel.tp, self.parallel.pp):     # every rank, in this order
            counts = comm.all_gather(counts, dim=0).min(dim=0, keepdim=True).values
        num_blocks, num_swap = counts[0].tolist()
        return num_blocks, num_swap

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        per_block = kv_cache.kv_bytes_per_block(self.kv_config, cfg.block_size, self.dtype)
        if self.device.type != "cuda":
            return kv_cache.cpu_num_blocks(cfg, per_block)
        num = kv_cache.profile_gpu_blocks(self, per_block)
        min_blocks = cdiv(cfg.max_model_len, cfg.block_size)   # one full-length sequence
        if num < min_blocks:
            raise ValueError(
                f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves room for {num} KV "
                f"blocks, fewer than one max_model_len={cfg.max_model_len} sequence needs "
                f"({min_blocks}); raise gpu_memory_utilization or lower max_model_len")
        return num

    # -- the step ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Apply the block moves, forward the scheduled tokens, sample: per scheduled
        sequence its sampled tokens (num_samples of them: 0 mid-prefill, n when a group
        forks). begin() then finish()."""
        self.begin(out)
        return self.finish(out)

    @torch.inference_mode()
    def begin(self, out: SchedulerOutput) -> None:
        """This rank's share of the step: block moves, its stage's forward pass, the
        activations (or the last stage's logits, to the driver) sent on. Pipeline
        microbatches begin several steps before finishing the first."""
        self.requests.update(out)
        with nvtx_range("cache_ops"):
            self.kv.apply_cache_ops(out)
        if out.scheduled:
            self._forward(out, self.kv.kv_caches, self.requests, self.graph_runner)

    @torch.inference_mode()
    def finish(self, out: SchedulerOutput) -> RunnerOutput:
        """The driver: the oldest begun step's logits (received from the last stage),
        sampled. Other ranks: an empty RunnerOutput."""
        if not out.scheduled:
            return RunnerOutput()
        sampling, logits = self.pipeline.pop(self.model_config.vocab_size, self.device)
        if not self.parallel.is_driver:
            return RunnerOutput()
        with nvtx_range("sample"):
            sampled = self._sample(len(out.scheduled), sampling, logits)
        return RunnerOutput(seq_ids=[s.seq_id for s in out.scheduled], sampled=sampled)

    @torch.inference_mode()
    def profile_step(self, out: SchedulerOutput, kv_caches: list) -> RunnerOutput:
        """One step of dummy requests on scratch KV caches, through the same path as
        execute() (the GPU memory profile); its request state is not kept."""
        requests = RequestStates(self.device)
        requests.update(out)
        self._forward(out, kv_caches, requests, graphs=None)
        return self.finish(out)

    def _forward(self, out: SchedulerOutput, kv_caches: list, requests: RequestStates,
                 graphs: Optional[cuda_graphs.DecodeGraphRunner]) -> None:
        """The step's forward pass on this rank, left in self.pipeline for finish()."""
        with nvtx_range("prepare"):
            # The step's attention is planned once, in AttentionMetadata, for these caches.
            spec = AttentionSpec.of(self.kv_config, kv_caches[0][0])
            input_ids, positions, meta = self.inputs.prepare(out.scheduled, spec)
            # Before the forward pass: it depends only on the schedule, and building it
            # (pinned, non-blocking uploads) never waits for the device. Only the driver
            # samples; the last stage knows from the schedule whether anything is.
            sampling = None
            if self.parallel.is_driver:
                sampling = self.inputs.prepare_sampling(out.scheduled, requests,
                                                        out.grammar_bitmask, out.grammar_seq_ids)
        with nvtx_range("forward"):
            if graphs is not None and graphs.can_run(input_ids, meta):
                output = graphs.run(input_ids, positions, meta)               # [S, V]
            else:
                # Later pipeline stages start from the previous stage's activations.
                activations = self.pipeline.recv_activations(
                    input_ids.shape[0], self.model_config.hidden_size, self.dtype, self.device)
                # [S, V] logits on the last stage, else [2, T, hidden] activations
                args = (input_ids, positions, kv_caches, meta)
                output = self.model(*args) if activations is None else self.model(*args, activations)
        step = PendingStep(sampling, None, len(out.scheduled), any(s.num_samples for s in out.scheduled))
        self.pipeline.push(step, output)
    def _sample(self, num_seqs: int, sampling: Optional[SamplingStep],
                logits: torch.Tensor) -> list[list[SampledToken]]:
        results: list[list[SampledToken]] = [[] for _ in range(num_seqs)]
        if sampling is None:
            return results
        if sampling.row_index is not None:
            logits = logits.index_select(0, sampling.row_index)
        for a, b, batch in sampling.chunks:
            tokens = sampled_tokens(self.sampler(logits[a:b], batch), sampling.params[a:b])
            for i, tok in zip(sampling.rows[a:b], tokens):
                results[i].append(tok)
        return results
