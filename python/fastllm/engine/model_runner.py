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

from fastllm.engine import cuda_graphs, kv_cache
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
                 parallel=None):
        self.model = model
        self.parallel = parallel        # this rank's ParallelContext (None: a single device)
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        # valid_vocab_size: the ids the tokenizer knows (< the embedding's rows when padded).
        self.sampler = Sampler(valid_vocab_size)
        self.inputs = InputBatch(self.device, engine_config.block_size, engine_config.max_num_seqs,
                                 model_config.vocab_size)
        self.requests = RequestStates(self.device)
        self.kv = kv_cache.KVCache(model_config, engine_config,
                                   engine_config.num_kv_blocks or self._auto_num_blocks(),
                                   device=self.device, dtype=dtype)
        # Decode CUDA graphs, captured once the KV caches exist (they read and write them);
        # None = every step runs eagerly.
        self.graph_runner = cuda_graphs.build_decode_graphs(
            model, self.kv.kv_caches, model_config, engine_config, self.device)

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

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        per_block = kv_cache.kv_bytes_per_block(self.model_config, cfg.block_size, self.dtype)
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
        forks)."""
        self.requests.update(out)
        with nvtx_range("cache_ops"):
            self.kv.apply_cache_ops(out)
        if not out.scheduled:
            return RunnerOutput()
        return self._run(out, self.kv.kv_caches, self.requests, self.graph_runner)

    @torch.inference_mode()
    def profile_step(self, out: SchedulerOutput, kv_caches: list) -> RunnerOutput:
        """One step of dummy requests on scratch KV caches, through the same path as
        execute() (the GPU memory profile); its request state is not kept."""
        requests = RequestStates(self.device)
        requests.update(out)
        return self._run(out, kv_caches, requests, graphs=None)

    def _run(self, out: SchedulerOutput, kv_caches: list, requests: RequestStates,
             graphs: Optional[cuda_graphs.DecodeGraphRunner]) -> RunnerOutput:
        with nvtx_range("prepare"):
            # The step's attention is planned once, in AttentionMetadata, for these caches.
            spec = AttentionSpec.of(self.model_config, kv_caches[0][0])
            input_ids, positions, meta = self.inputs.prepare(out.scheduled, spec)
            # Before the forward pass: it depends only on the schedule, and building it
            # (pinned, non-blocking uploads) never waits for the device.
            sampling = self.inputs.prepare_sampling(out.scheduled, requests,
                                                    out.grammar_bitmask, out.grammar_seq_ids)
        with nvtx_range("forward"):
            if graphs is not None and graphs.can_run(input_ids, meta):
                logits = graphs.run(input_ids, positions, meta)               # [S, V]
            else:
                logits = self.model(input_ids, positions, kv_caches, meta)    # [S, V]
        with nvtx_range("sample"):
            sampled = self._sample(len(out.scheduled), sampling, logits)
        return RunnerOutput(seq_ids=[s.seq_id for s in out.scheduled], sampled=sampled)

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
