"""The KV cache's memory: how many blocks, the tensors, the swap space, the block moves.

Per layer, K and V as [num_blocks, block_size, num_kv_heads, head_dim]. The block ids
are the BlockManager's; this module only holds the memory they index.

Block moves (SchedulerOutput.blocks_to_copy / _swap_out / _swap_in) run before the
forward pass: fork copies, swap-outs to the preallocated CPU swap space (page-locked in
place on a GPU, exactly its size: fastllm.engine.host_memory), swap-ins back; close()
unpins the swap space (garbage collection does too).

Sizing when num_kv_blocks is not given. CPU: enough for max_num_seqs full-length
sequences, capped by a share of free RAM. GPU (gpu_memory_utilization of the device, as
torch.cuda.memory_reserved counts it): the profiled peak of one step through the real
step path (ModelRunner.profile_step, nano-vllm's warm-up) on dummy requests --
max_num_batched_tokens tokens fed, max_num_seqs rows sampled with every filter and
penalty on -- (weights included), what the decode graphs will hold (static buffers + the
pool of one forward pass at the largest bucket, measured eagerly), and what other
processes use come off first; the KV cache gets the rest (kv_blocks_for_budget).
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Optional

import numpy as np
import torch

from fastllm.engine import cuda_graphs
from fastllm.engine.host_memory import PinnedHostTensor
from fastllm.engine.staging import StagingBuffer
from fastllm.engine.step_data import NewRequest, ScheduledSeq, SchedulerOutput
from fastllm.model.layers import allocate_kv_caches
from fastllm.sampling_params import SamplingParams
from fastllm.utils import cdiv

logger = logging.getLogger(__name__)

# CPU KV cache when num_kv_blocks is not given: enough for max_num_seqs full-length
# sequences, but no more than this share of available RAM (and this many bytes).
_CPU_KV_RAM_FRACTION = 0.25
_CPU_KV_MAX_BYTES = 2 << 30
# torch's caching allocator rounds a large allocation up to a multiple of 2 MiB: at most
# this much more per KV tensor than its bytes.
_KV_TENSOR_ROUNDING = 2 << 20

# The profile step's requests: every filter, penalty and logprobs on (the most
# [rows, vocab] temporaries a step can hold), with this many output / prompt tokens each.
PROFILE_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05,
                                repetition_penalty=1.1, presence_penalty=0.5,
                                frequency_penalty=0.5, logprobs=20)
_PROFILE_TOKENS = 16


def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
    c = model_config
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * elem


def kv_blocks_for_budget(total_bytes: int, gpu_memory_utilization: float, peak_bytes: int,
                         used_by_others: int, graph_reserve: int, bytes_per_block: int,
                         num_kv_tensors: int) -> int:
    """KV blocks that fit in gpu_memory_utilization of the device after the profiled peak
    (weights + activations + sampler), memory other processes hold, the decode graphs'
    reserve, and the allocator's rounding of each of the num_kv_tensors KV tensors."""
    budget = (total_bytes * gpu_memory_utilization - peak_bytes - used_by_others - graph_reserve
              - num_kv_tensors * _KV_TENSOR_ROUNDING)
    return max(0, int(budget // bytes_per_block))


def cpu_num_blocks(engine_config, per_block: int) -> int:
    cfg = engine_config
    min_blocks = cdiv(cfg.max_model_len, cfg.block_size)   # one full-length sequence
    wanted = cfg.max_num_seqs * min_blocks
    cap = min(_CPU_KV_MAX_BYTES, int(_available_ram() * _CPU_KV_RAM_FRACTION)) // per_block
    return max(min_blocks, min(wanted, cap))


def profile_step(engine_config, vocab_size: int) -> tuple[SchedulerOutput, int]:
    """The dummy step the GPU profile runs, and the KV blocks it needs: as many
    max_model_len prompts as max_num_batched_tokens fills (the last one shorter), all fed
    at once, then max_num_seqs rows sampled (the last prompt forks into the rest)."""
    cfg = engine_config
    num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
    seq_len = min(num_tokens, cfg.max_model_len)
    num_seqs = cdiv(num_tokens, seq_len)
    blocks_per_seq = cdiv(seq_len, cfg.block_size)
    lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
    outputs = [t % vocab_size for t in range(_PROFILE_TOKENS)]
    out = SchedulerOutput()
    for i, n in enumerate(lens):
        rid = f"profile-{i}"
        out.new_requests.append(NewRequest(rid, outputs, PROFILE_PARAMS))
        samples = cfg.max_num_seqs - num_seqs + 1 if i == num_seqs - 1 else 1
        table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        out.scheduled.append(ScheduledSeq(
            rid, -1 - i, [0] * n, 0, table, num_samples=samples,
            num_output_tokens=_PROFILE_TOKENS, output_token_ids=outputs))
    return out, num_seqs * blocks_per_seq


@torch.inference_mode()
def profile_gpu_blocks(runner, per_block: int) -> int:
    """Peak memory of the profile step (weights included) and what the decode graphs will
    take, then KV blocks for what gpu_memory_utilization leaves of the device's memory.
    Peaks are of reserved memory (the allocator's segments, >= what tensors use): what
    the device gives up."""
    cfg, device, model_config = runner.config, runner.device, runner.kv_config   # this rank's heads, layers
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    out, num_blocks = profile_step(cfg, model_config.vocab_size)
    caches = allocate_kv_caches(model_config, num_blocks, cfg.block_size, dtype=runner.dtype,
                                device=device)
    runner.profile_step(out, caches)
    torch.cuda.synchronize(device)
    peak = max(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    graph_reserve = 0
    if cuda_graphs.graphs_enabled(cfg, device, model_config) and runner.graph_runner_allowed:
        graph_reserve = profile_decode_graphs(runner.model, caches, model_config, cfg, device)
    del caches
    gc.collect()  # what a reference cycle still holds goes back before measuring
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # Memory other processes hold counts against us too.
    used_by_others = max(0, total - free - torch.cuda.memory_reserved(device))
    num = kv_blocks_for_budget(total, cfg.gpu_memory_utilization, peak, used_by_others,
                               graph_reserve, per_block, 2 * model_config.num_hidden_layers)
    logger.info("KV cache: %d blocks of %d tokens (%.2f GiB); profiled peak %.2f GiB, "
                "decode graphs %.2f GiB", num, cfg.block_size, num * per_block / (1 << 30),
                peak / (1 << 30), graph_reserve / (1 << 30))
    return num


def profile_decode_graphs(model, caches: list, model_config, engine_config, device) -> int:
    """Bytes the decode graphs will hold: their static buffers (computed from the specs
    the graph runner allocates) and their private pool, which capture fills with one
    forward pass of the largest bucket -- measured here as the peak of that forward pass
    run eagerly through the same runner code on the same padding inputs."""
    shape = cuda_graphs.capture_shape(model_config, engine_config)
    static = cuda_graphs.static_buffer_bytes(shape.max_batch_size, shape.max_blocks_per_seq,
                                             shape.vocab_size)
    graphs = cuda_graphs.DecodeGraphRunner(
        model, caches, batch_sizes=[shape.max_batch_size],
        max_blocks_per_seq=shape.max_blocks_per_seq, vocab_size=shape.vocab_size,
        device=device, capturer=cuda_graphs.EagerCapturer())
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    graphs.capture()                    # EagerCapturer: one eager forward pass
    torch.cuda.synchronize(device)
    activations = max(torch.cuda.max_memory_allocated(device) - allocated,
                      torch.cuda.max_memory_reserved(device) - reserved)
    graphs.release()
    del graphs
    return static + max(0, activations)


class KVCache:
    """The KV tensors of num_blocks blocks and num_swap_blocks of CPU swap space."""

    def __init__(self, model_config, engine_config, num_blocks: int, *,
                 device: torch.device, dtype: torch.dtype, num_swap_blocks: Optional[int] = None):
        """model_config: this rank's (its KV heads and layers); num_swap_blocks: None for
        what swap_space holds (a parallel runner passes the count every rank can hold)."""
        self.device = device
        self.num_blocks = num_blocks
        self.bytes_per_block = kv_bytes_per_block(model_config, engine_config.block_size, dtype)
        self.kv_caches = allocate_kv_caches(model_config, num_blocks, engine_config.block_size,
                                            dtype=dtype, device=device)
        # CPU swap space: swap_space GiB of blocks, made once (page-locked on a GPU, so
        # swaps are asynchronous copies); the BlockManager hands out its block ids.
        self.num_swap_blocks = (int(engine_config.swap_space * (1 << 30)) // self.bytes_per_block
                                if num_swap_blocks is None else num_swap_blocks)
        # One tensor [L, 2 (K, V), num_swap_blocks, *block shape] with per-layer views,
        # pinned by cudaHostRegister at exactly its size (torch's pinned allocator would
        # round it up to a power of two).
        self._swap_memory: Optional[PinnedHostTensor] = None
        self.swap_tensor: Optional[torch.Tensor] = None
        self.swap_caches: list = []
        if self.num_swap_blocks:
            block_shape = tuple(self.kv_caches[0][0].shape[1:])
            self._swap_memory = PinnedHostTensor(
                (len(self.kv_caches), 2, self.num_swap_blocks) + block_shape, dtype, device)
            self.swap_tensor = self._swap_memory.tensor
            self.swap_caches = [(layer[0], layer[1]) for layer in self.swap_tensor]
        self._copy_staging = StagingBuffer(device)       # fork copies' block ids

    def close(self) -> None:
        """Release the swap space's page locking (after the device has finished with it).
        Idempotent; no swaps afterwards."""
        memory = getattr(self, "_swap_memory", None)      # absent if __init__ failed early
        self.swap_caches, self.swap_tensor, self._swap_memory = [], None, None
        if memory is not None:
            memory.close()

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
