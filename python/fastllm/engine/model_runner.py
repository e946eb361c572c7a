"""Runs one scheduled step: flattened batch in, sampled tokens out. Owns the KV caches.

For S scheduled sequences with q_i tokens each (prefill chunks and decodes mixed), the
model sees one super-sequence of T = sum(q_i) tokens (seeds/001):
  input_ids, positions, slot_mapping  [T]
  block_tables [S, max_blocks] int32, seq_lens [S] int32 (cached + this step's tokens),
  query_start_loc [S+1] int32
and returns the logits of each sequence's last query token, [S, V]. Only rows whose
known tokens are all computed after this step are sampled (a mid-prefill chunk is not).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fastllm.engine.scheduler import SchedulerOutput
from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
from fastllm.model.sampler import Sampler, SamplingBatch
from fastllm.outputs import Logprob
from fastllm.profiling import nvtx_range

logger = logging.getLogger(__name__)

# CPU KV cache when num_kv_blocks is not given: enough for max_num_seqs full-length
# sequences, but no more than this share of available RAM (and this many bytes).
_CPU_KV_RAM_FRACTION = 0.25
_CPU_KV_MAX_BYTES = 2 << 30


@dataclass
class SampledToken:
    token_id: int
    logprob: Optional[float] = None
    top_logprobs: Optional[dict] = None      # token id -> Logprob (chosen + top-N), when asked


class ModelRunner:
    def __init__(self, model, model_config, engine_config, *,
                 device: torch.device, dtype: torch.dtype, eos_token_ids=()):
        self.model = model
        self.model_config = model_config
        self.config = engine_config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = engine_config.block_size
        self.eos_token_ids = list(eos_token_ids)
        self.sampler = Sampler()
        self.num_kv_blocks = engine_config.num_kv_blocks or self._auto_num_blocks()
        self.kv_caches = allocate_kv_caches(model_config, self.num_kv_blocks, self.block_size,
                                            dtype=dtype, device=self.device)

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
        """Peak memory of a max_num_batched_tokens forward pass (weights included), then
        KV blocks for what gpu_memory_utilization leaves of the device's memory."""
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
                                         device=self.device))
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        self.model(ids, positions, caches, meta)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del caches
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory other processes hold counts against us too.
        used_by_others = max(0, total - free - torch.cuda.memory_reserved(self.device))
        budget = total * cfg.gpu_memory_utilization - peak - used_by_others
        num = max(0, int(budget // per_block))
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB); profiled peak %.2f GiB",
                    num, self.block_size, num * per_block / (1 << 30), peak / (1 << 30))
        return num

    # -- CacheOps for the scheduler ------------------------------------------------------
    def swap_out(self, block_ids: list[int]):
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        pin = self.device.type == "cuda"
        saved = []
        for k, v in self.kv_caches:
            k_cpu, v_cpu = k.index_select(0, idx).cpu(), v.index_select(0, idx).cpu()
            saved.append((k_cpu.pin_memory(), v_cpu.pin_memory()) if pin else (k_cpu, v_cpu))
        return saved

    def swap_in(self, saved, block_ids: list[int]) -> None:
        idx = torch.tensor(block_ids, dtype=torch.int64, device=self.device)
        for (k, v), (k_cpu, v_cpu) in zip(self.kv_caches, saved):
            k.index_copy_(0, idx, k_cpu.to(self.device, non_blocking=True))
            v.index_copy_(0, idx, v_cpu.to(self.device, non_blocking=True))

    def copy_block(self, src: int, dst: int) -> None:
        for k, v in self.kv_caches:
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    # -- the step ------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> tuple:
        """(input_ids, positions, AttentionMetadata) for the scheduled mix."""
        bs = self.block_size
        scheduled = out.scheduled
        num_seqs = len(scheduled)
        max_blocks = max(len(s.seq.block_table) for s in scheduled)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        ids, pos, slots, seq_lens = [], [], [], np.empty(num_seqs, dtype=np.int32)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        for i, s in enumerate(scheduled):
            seq = s.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_tokens
            table = np.asarray(seq.block_table, dtype=np.int64)
            block_tables[i, :len(table)] = table
            p = np.arange(start, end, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            seq_lens[i] = end
            query_start_loc[i + 1] = query_start_loc[i] + s.num_tokens

        def dev(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(slot_mapping=dev(np.concatenate(slots), torch.int64),
                                 block_tables=dev(block_tables, torch.int32),
                                 seq_lens=dev(seq_lens, torch.int32),
                                 query_start_loc=dev(query_start_loc, torch.int32))
        return dev(np.concatenate(ids), torch.int64), dev(np.concatenate(pos), torch.int64), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[list[SampledToken]]:
        """Forward the scheduled tokens; per scheduled sequence, its sampled tokens
        (num_samples of them: 0 mid-prefill, n when a group forks)."""
        with nvtx_range("prepare"):
            input_ids, positions, meta = self.prepare(out)
        with nvtx_range("forward"):
            logits = self.model(input_ids, positions, self.kv_caches, meta)  # [S, V]
        with nvtx_range("sample"):
            return self._sample(out, logits)

    def _sample(self, out: SchedulerOutput, logits: torch.Tensor) -> list[list[SampledToken]]:
        rows, params, gens, prompts, outputs = [], [], [], [], []
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            for _ in range(s.num_samples):
                rows.append(i)
                params.append(seq.params)
                gens.append(seq.group.generator)
                prompts.append(seq.group.prompt_token_ids)
                outputs.append(seq.output_token_ids)
        results: list[list[SampledToken]] = [[] for _ in out.scheduled]
        if not rows:
            return results
        batch = SamplingBatch.from_requests(params, gens, prompts, outputs, device=self.device,
                                            eos_token_ids=self.eos_token_ids)
        if rows != list(range(logits.shape[0])):      # some rows mid-prefill, or a fork
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64, device=logits.device))
        sampled = self.sampler(logits, batch)
        token_ids = sampled.sampled_token_ids.tolist()
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
        return results


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
