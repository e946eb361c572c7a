"""Runs one scheduled step: flattened batch in, sampled tokens out. Owns the KV caches.

For S scheduled sequences with q_i tokens each (prefill chunks and decodes mixed), the
model sees one super-sequence of T = sum(q_i) tokens (seeds/001):
  input_ids, positions, slot_mapping  [T]
  block_tables [S, max_blocks] int32, seq_lens [S] int32 (cached + this step's tokens),
  query_start_loc [S+1] int32
and returns the logits of each sequence's last query token, [S, V]. Only rows whose
known tokens are all computed after this step are sampled (a mid-prefill chunk is not).

Before the forward pass the runner applies the scheduler's block moves (it is the only
one that touches KV tensors): fork copies, swap-outs to the preallocated CPU swap space
(page-locked in place on a GPU, exactly its size: fastllm.engine.host_memory), swap-ins
back; close() unpins the swap space (garbage collection does too). The step's index
tensors and its sampling batch are built on the host and uploaded from pinned staging
buffers (fastllm.engine.staging) before the forward pass is launched, so on a GPU the
only wait per step is reading back the sampled ids.

On a GPU, steps that feed one token per sequence (decodes) replay a CUDA graph captured
at start-up for the smallest batch-size bucket that fits (fastllm.engine.cuda_graphs);
enforce_eager=True, the CPU, or a failed capture keep every step eager.

GPU memory (gpu_memory_utilization of the device, as torch.cuda.memory_reserved counts
it): the profiled peak of a max_num_batched_tokens forward pass and of the sampler at
max_num_seqs rows (weights included), what the decode graphs will hold (static buffers +
the pool of one forward pass at the largest bucket, measured eagerly), and what other
processes use come off first; the KV cache gets the rest (kv_blocks_for_budget).
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

import torch

from fastllm.engine import cuda_graphs
from fastllm.engine.host_memory import PinnedHostTensor
from fastllm.engine.scheduler import SchedulerOutput
from fastllm.engine.staging import StagingBuffer
from fastllm.model.layers import AttentionMetadata, AttentionSpec, allocate_kv_caches
from fastllm.model.sampler import Sampler, SamplingBatch, StagedBatch
from fastllm.outputs import Logprob
from fastllm.profiling import nvtx_range
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# CPU KV cache when num_kv_blocks is not given: enough for max_num_seqs full-length
# sequences, but no more than this share of available RAM (and this many bytes).
_CPU_KV_RAM_FRACTION = 0.25
_CPU_KV_MAX_BYTES = 2 << 30
# torch's caching allocator rounds a large allocation up to a multiple of 2 MiB: at most
# this much more per KV tensor than its bytes.
_KV_TENSOR_ROUNDING = 2 << 20


def kv_blocks_for_budget(total_bytes: int, gpu_memory_utilization: float, peak_bytes: int,
                         used_by_others: int, graph_reserve: int, bytes_per_block: int,
                         num_kv_tensors: int) -> int:
    """KV blocks that fit in gpu_memory_utilization of the device after the profiled peak
    (weights + activations + sampler), memory other processes hold, the decode graphs'
    reserve, and the allocator's rounding of each of the num_kv_tensors KV tensors."""
    budget = (total_bytes * gpu_memory_utilization - peak_bytes - used_by_others - graph_reserve
              - num_kv_tensors * _KV_TENSOR_ROUNDING)
    return max(0, int(budget // bytes_per_block))


# The sampler profile's requests: every filter, penalty and logprobs on (the most
# [rows, vocab] temporaries a step can hold), with this many output / prompt tokens each.
_PROFILE_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05,
                                 repetition_penalty=1.1, presence_penalty=0.5,
                                 frequency_penalty=0.5, logprobs=20)
_PROFILE_TOKENS = 16


@dataclass
class SamplingStep:
    """A step's sampling, built before its forward pass (see ModelRunner.prepare_sampling)."""
    rows: list[int]                       # per sampled row: its scheduled sequence's index
    params: list[SamplingParams]          # per sampled row
    row_index: Optional[torch.Tensor]     # [R] int64 logits rows to sample; None: all, in order
    chunks: list[tuple[int, int, SamplingBatch]]   # (start, end, batch), <= max_num_seqs rows each


@dataclass
class SampledToken:
    token_id: int
    logprob: Optional[float] = None
    top_logprobs: Optional[dict] = None      # token id -> Logprob (chosen + top-N), when asked


class ModelRunner:
    def __init__(self, model, model_config, engine_config, *,
                 device: torch.device, dtype: torch.dtype, valid_vocab_size: Optional[int] = None):
        self.model = model
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = engine_config.block_size
        # valid_vocab_size: the ids the tokenizer knows (< the embedding's rows when padded).
        self.sampler = Sampler(valid_vocab_size)
        self.num_kv_blocks = engine_config.num_kv_blocks or self._auto_num_blocks()
        self.kv_caches = allocate_kv_caches(model_config, self.num_kv_blocks, self.block_size,
                                            dtype=dtype, device=self.device)
        # CPU swap space: swap_space GiB of blocks, made once (page-locked on a GPU, so
        # swaps are asynchronous copies); the scheduler hands out its block ids.
        self.num_swap_blocks = int(engine_config.swap_space * (1 << 30)) // self.kv_bytes_per_block()
        # One tensor [L, 2 (K, V), num_swap_blocks, *block shape] with per-layer views,
        # pinned by cudaHostRegister at exactly its size (torch's pinned allocator would
        # round it up to a power of two).
        self._swap_memory: Optional[PinnedHostTensor] = None
        self.swap_tensor: Optional[torch.Tensor] = None
        self.swap_caches: list = []
        if self.num_swap_blocks:
            block_shape = tuple(self.kv_caches[0][0].shape[1:])
            self._swap_memory = PinnedHostTensor(
                (len(self.kv_caches), 2, self.num_swap_blocks) + block_shape, dtype, self.device)
            self.swap_tensor = self._swap_memory.tensor
            self.swap_caches = [(layer[0], layer[1]) for layer in self.swap_tensor]
        # Host staging (pinned on a GPU, reused): one buffer per upload of a step, so none
        # is overwritten before its copy has left it.
        self._copy_staging = StagingBuffer(self.device)       # fork copies' block ids
        self._index_staging = StagingBuffer(self.device)      # prepare()'s index tensors
        self._sampling_staging = StagingBuffer(self.device)   # the sampling batch
        # Decode CUDA graphs, captured once the KV caches exist (they read and write them);
        # None = every step runs eagerly.
        self.graph_runner = cuda_graphs.build_decode_graphs(
            model, self.kv_caches, model_config, engine_config, self.device)

    def close(self) -> None:
        """Release what outlives a plain garbage collection's order: the swap space's page
        locking (after the device has finished with it). Idempotent; the runner can no
        longer swap afterwards."""
        memory = getattr(self, "_swap_memory", None)      # absent if __init__ failed early
        self.swap_caches, self.swap_tensor, self._swap_memory = [], None, None
        if memory is not None:
            memory.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finalizer (e.g. at exit)
            pass

    # -- KV cache sizing ---------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * c.num_hidden_layers * self.block_size * c.num_key_value_heads * c.head_dim * elem

    def _auto_num_blocks(self) -> int:
        cfg = self.config
        per_block = self.kv_bytes_per_block()
        min_blocks = -(-cfg.max_model_len // self.block_size)   # one full-length sequence
        if self.device.type == "cuda":
            num = self._profile_gpu_blocks(per_block)
            if num < min_blocks:
                raise ValueError(
                    f"gpu_memory_utilization={cfg.gpu_memory_utilization} leaves room for {num} KV "
                    f"blocks, fewer than one max_model_len={cfg.max_model_len} sequence needs "
                    f"({min_blocks}); raise gpu_memory_utilization or lower max_model_len")
            return num
        wanted = cfg.max_num_seqs * min_blocks
        cap = min(_CPU_KV_MAX_BYTES, int(_available_ram() * _CPU_KV_RAM_FRACTION)) // per_block
        return max(min_blocks, min(wanted, cap))

    @torch.inference_mode()
    def _profile_gpu_blocks(self, per_block: int) -> int:
        """Peak memory of a max_num_batched_tokens forward pass and of the sampler (weights
        included), and what the decode graphs will take, then KV blocks for what
        gpu_memory_utilization leaves of the device's memory. Peaks are of reserved memory
        (the allocator's segments, >= what tensors use): what the device gives up."""
        cfg = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        seq_len = min(num_tokens, cfg.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        caches = allocate_kv_caches(self.model_config, num_seqs * blocks_per_seq, self.block_size,
                                    dtype=self.dtype, device=self.device)
        lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, -1)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            block_tables=tables.to(self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32,
                                         device=self.device),
            max_query_len=max(lens))
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        self.model(ids, positions, caches, meta)
        self._profile_sampler()
        torch.cuda.synchronize(self.device)
        peak = max(torch.cuda.max_memory_allocated(self.device),
                   torch.cuda.max_memory_reserved(self.device))
        graph_reserve = 0
        if cuda_graphs.graphs_enabled(cfg, self.device, self.model_config):
            graph_reserve = self._profile_decode_graphs(caches)
        del caches
        gc.collect()  # what a reference cycle still holds goes back before measuring
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory other processes hold counts against us too.
        used_by_others = max(0, total - free - torch.cuda.memory_reserved(self.device))
        num = kv_blocks_for_budget(total, cfg.gpu_memory_utilization, peak, used_by_others,
                                   graph_reserve, per_block, 2 * self.model_config.num_hidden_layers)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB); profiled peak %.2f GiB, "
                    "decode graphs %.2f GiB", num, self.block_size, num * per_block / (1 << 30),
                    peak / (1 << 30), graph_reserve / (1 << 30))
        return num

    def _profile_decode_graphs(self, caches: list) -> int:
        """Bytes the decode graphs will hold: their static buffers (computed from the specs
        the graph runner allocates) and their private pool, which capture fills with one
        forward pass of the largest bucket -- measured here as the peak of that forward pass
        run eagerly through the same runner code on the same padding inputs."""
        shape = cuda_graphs.capture_shape(self.model_config, self.config)
        static = cuda_graphs.static_buffer_bytes(shape.max_batch_size, shape.max_blocks_per_seq,
                                                 shape.vocab_size)
        runner = cuda_graphs.DecodeGraphRunner(
            self.model, caches, batch_sizes=[shape.max_batch_size],
            max_blocks_per_seq=shape.max_blocks_per_seq, vocab_size=shape.vocab_size,
            device=self.device, capturer=cuda_graphs.EagerCapturer())
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        runner.capture()                    # EagerCapturer: one eager forward pass
        torch.cuda.synchronize(self.device)
        activations = max(torch.cuda.max_memory_allocated(self.device) - allocated,
                          torch.cuda.max_memory_reserved(self.device) - reserved)
        runner._replays.clear()  # the replay closures refer back to the runner: a cycle
        del runner
        return static + max(0, activations)

    def _profile_sampler(self) -> None:
        """The sampler's peak at the most rows a step samples (max_num_seqs: _sample
        splits bigger steps): [rows, V] float32 logits and their clone, raw logprobs and
        the rank mask, penalty counts / seen masks / expanded penalty and the torch.where
        temporaries, probabilities and the top-p sort -- far above what the profiled
        forward's few logits rows need (GBs at 256 rows x 128k vocab)."""
        num_rows = self.config.max_num_seqs
        vocab = self.model_config.vocab_size
        logits = torch.randn(num_rows, vocab, dtype=torch.float32, device=self.device)
        tokens = [t % vocab for t in range(_PROFILE_TOKENS)]
        batch = SamplingBatch.from_requests(
            [_PROFILE_PARAMS] * num_rows, [None] * num_rows, [tokens] * num_rows,
            [tokens] * num_rows, self.device, vocab_size=vocab)
        self.sampler(logits, batch)

    # -- block moves the scheduler asked for ---------------------------------------------
    def apply_cache_ops(self, out: SchedulerOutput) -> None:
        """Fork copies first: they were decided after the last step, so their source is
        intact now and a child swapped out in this step must carry the copied block.
        Then swap-outs (they read blocks this step's forward may overwrite), then swap-ins.
        All copies are queued on the device's stream, ahead of the forward pass."""
        if out.blocks_to_copy:
            pairs = np.asarray(out.blocks_to_copy, dtype=np.int64)        # [C, 2] (src, dst)
            ids = self._copy_staging.pack({"src": pairs[:, 0], "dst": pairs[:, 1]})
            src, dst = ids["src"], ids["dst"]
            for k, v in self.kv_caches:
                k.index_copy_(0, dst, k.index_select(0, src))
                v.index_copy_(0, dst, v.index_select(0, src))
        if (out.blocks_to_swap_out or out.blocks_to_swap_in) and not self.swap_caches:
            raise RuntimeError("block swaps scheduled but the runner has no swap space "
                               "(swap_space=0, or close() released it)")
        non_blocking = self.device.type == "cuda"
        for gpu, cpu, n in _runs(out.blocks_to_swap_out):
            for (k, v), (k_swap, v_swap) in zip(self.kv_caches, self.swap_caches):
                k_swap[cpu:cpu + n].copy_(k[gpu:gpu + n], non_blocking=non_blocking)
                v_swap[cpu:cpu + n].copy_(v[gpu:gpu + n], non_blocking=non_blocking)
        for cpu, gpu, n in _runs(out.blocks_to_swap_in):
            for (k, v), (k_swap, v_swap) in zip(self.kv_caches, self.swap_caches):
                k[gpu:gpu + n].copy_(k_swap[cpu:cpu + n], non_blocking=non_blocking)
                v[gpu:gpu + n].copy_(v_swap[cpu:cpu + n], non_blocking=non_blocking)

    # -- the step ------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> tuple:
        """(input_ids, positions, AttentionMetadata) for the scheduled mix. Everything is
        written into one int64 host buffer, laid out as
            input_ids [T] | positions [T] | slot_mapping [T] | seq_lens [S] |
            query_start_loc [S+1] | block_tables [S * max_blocks]
        and copied to the device at once; the tensors are views of the device copy (the
        int32 ones cast there)."""
        bs = self.block_size
        scheduled = out.scheduled
        num_seqs = len(scheduled)
        num_tokens = sum(s.num_tokens for s in scheduled)
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        t3, s1 = 3 * num_tokens, 3 * num_tokens + num_seqs
        total = s1 + num_seqs + 1 + num_seqs * max_blocks
        host = self._index_staging.host(8 * total).view(torch.int64)
        buf = host.numpy()
        ids, pos, slots = buf[:num_tokens], buf[num_tokens:2 * num_tokens], buf[2 * num_tokens:t3]
        seq_lens, query_start_loc = buf[t3:s1], buf[s1:s1 + num_seqs + 1]
        block_tables = buf[s1 + num_seqs + 1:total].reshape(num_seqs, max_blocks)
        block_tables.fill(0)
        query_start_loc[0] = 0
        t = 0
        for i, s in enumerate(scheduled):
            seq, q = s.seq, s.num_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            if len(table) * bs < start + q:
                # Indexing the zero-padded row would silently write block 0 (another
                # sequence's KV): a scheduler bug must fail loudly instead.
                raise RuntimeError(
                    f"sequence {seq.seq_id} (request {seq.request_id!r}): block_table has "
                    f"{len(table)} blocks of {bs} tokens, too few for positions "
                    f"[{start}, {start + q})")
            block_tables[i, :len(table)] = table
            if q == 1:                                   # decode: no numpy temporaries
                ids[t] = seq.token_ids[start]
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                p = np.arange(start, start + q, dtype=np.int64)
                ids[t:t + q] = seq.token_ids[start:start + q]
                pos[t:t + q] = p
                slots[t:t + q] = np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs
            t += q
            seq_lens[i] = start + q
            query_start_loc[i + 1] = t
        dev = self._index_staging.upload(host)
        meta = AttentionMetadata(
            slot_mapping=dev[2 * num_tokens:t3],
            block_tables=dev[s1 + num_seqs + 1:total].view(num_seqs, max_blocks).to(torch.int32),
            seq_lens=dev[t3:s1].to(torch.int32),
            query_start_loc=dev[s1:s1 + num_seqs + 1].to(torch.int32),
            max_query_len=max(s.num_tokens for s in scheduled),
            spec=AttentionSpec.of(self.model_config, self.kv_caches[0][0]))  # plans the step's attention once
        return dev[:num_tokens], dev[num_tokens:2 * num_tokens], meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[list[SampledToken]]:
        """Forward the scheduled tokens; per scheduled sequence, its sampled tokens
        (num_samples of them: 0 mid-prefill, n when a group forks). The scheduler's block
        moves are applied first."""
        with nvtx_range("cache_ops"):
            self.apply_cache_ops(out)
        if not out.scheduled:
            return []
        with nvtx_range("prepare"):
            input_ids, positions, meta = self.prepare(out)
            # Before the forward pass: it depends only on the schedule, and building it
            # (pinned, non-blocking uploads) never waits for the device.
            sampling = self.prepare_sampling(out)
        with nvtx_range("forward"):
            if self.graph_runner is not None and self.graph_runner.can_run(input_ids, meta):
                logits = self.graph_runner.run(input_ids, positions, meta)     # [S, V]
            else:
                logits = self.model(input_ids, positions, self.kv_caches, meta)  # [S, V]
        with nvtx_range("sample"):
            return self._sample(out, sampling, logits)

    def prepare_sampling(self, out: SchedulerOutput) -> Optional[SamplingStep]:
        """The step's sampling batches (None when no row is sampled), all uploaded in one
        pinned copy. A step samples more rows than max_num_seqs only when n > 1 prompts
        complete together; it is then split into chunks of max_num_seqs rows, the most
        the sampler's memory was profiled for."""
        rows, params, gens, prompts, outputs, num_outputs = [], [], [], [], [], []
        for i, s in enumerate(out.scheduled):
            if not s.num_samples:
                continue
            seq = s.seq
            group = seq.group
            p = group.sampling_params
            # Token lists only for the penalties (most requests have none). The prompt
            # goes up once per request: later steps pass its cached device tensor.
            penalized = p.has_penalties
            prompt = None
            if penalized and p.repetition_penalty != 1.0:
                prompt = (group.device_prompt_tokens if group.device_prompt_tokens is not None
                          else group.prompt_token_ids)
            output = seq.output_token_ids if penalized else None
            for _ in range(s.num_samples):
                rows.append(i)
                params.append(p)
                gens.append(group.generator)
                prompts.append(prompt)
                outputs.append(output)
                num_outputs.append(seq.num_output_tokens)
        if not rows:
            return None
        cap = self.config.max_num_seqs
        staged: list[tuple[int, int, StagedBatch]] = []
        arrays = {}
        for c, a in enumerate(range(0, len(rows), cap)):
            b = min(a + cap, len(rows))
            st = SamplingBatch.stage(params[a:b], gens[a:b], prompts[a:b], outputs[a:b], self.device,
                                     num_output_tokens=num_outputs[a:b],
                                     vocab_size=self.model_config.vocab_size)
            staged.append((a, b, st))
            arrays.update((f"{c}/{name}", v) for name, v in st.arrays.items())
        in_order = rows == list(range(len(out.scheduled)))    # else some rows mid-prefill, or a fork
        if not in_order:
            arrays["rows"] = np.asarray(rows, dtype=np.int64)
        dev = self._sampling_staging.pack(arrays)
        chunks = []
        for c, (a, b, st) in enumerate(staged):
            prefix = f"{c}/"
            batch = st.finish({k[len(prefix):]: v for k, v in dev.items() if k.startswith(prefix)})
            for j, tensor in batch.prompt_token_tensors.items():
                group = out.scheduled[rows[a + j]].seq.group
                if group.device_prompt_tokens is None:
                    group.device_prompt_tokens = tensor
            chunks.append((a, b, batch))
        return SamplingStep(rows=rows, params=params, chunks=chunks,
                            row_index=None if in_order else dev["rows"])

    def _sample(self, out: SchedulerOutput, sampling: Optional[SamplingStep],
                logits: torch.Tensor) -> list[list[SampledToken]]:
        results: list[list[SampledToken]] = [[] for _ in out.scheduled]
        if sampling is None:
            return results
        if sampling.row_index is not None:
            logits = logits.index_select(0, sampling.row_index)
        for a, b, batch in sampling.chunks:
            self._sample_chunk(logits[a:b], batch, sampling.rows[a:b], sampling.params[a:b], results)
        return results

    def _sample_chunk(self, logits: torch.Tensor, batch: SamplingBatch, rows: list[int],
                      params: list[SamplingParams], results: list[list[SampledToken]]) -> None:
        sampled = self.sampler(logits, batch)
        token_ids = sampled.sampled_token_ids.tolist()       # the step's one wait for the device
        want_logprobs = sampled.sampled_logprobs is not None
        if want_logprobs:
            lps = sampled.sampled_logprobs.tolist()
            ranks = sampled.sampled_ranks.tolist()
            top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
            top_ids = sampled.top_token_ids.tolist() if sampled.top_token_ids is not None else None
        for j, (i, p) in enumerate(zip(rows, params)):
            tok = SampledToken(token_ids[j])
            if want_logprobs and p.logprobs is not None:
                tok.logprob = lps[j]
                top = {tok.token_id: Logprob(lps[j], ranks[j])}
                for r in range(p.logprobs if top_ids is not None else 0):
                    top.setdefault(top_ids[j][r], Logprob(top_lp[j][r], r + 1))
                tok.top_logprobs = top
            results[i].append(tok)


def _runs(pairs: list[tuple[int, int]]):
    """(a, b, n) for each run of pairs where both ids go up by one: one copy per run
    instead of one per block."""
    i = 0
    while i < len(pairs):
        a, b = pairs[i]
        n = 1
        while i + n < len(pairs) and pairs[i + n] == (a + n, b + n):
            n += 1
        yield a, b, n
        i += n


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
