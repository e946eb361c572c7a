"""CUDA graphs for decode steps: one captured forward pass per batch-size bucket.

A decode step (every scheduled sequence feeds exactly one token) launches hundreds of
small kernels whose CPU launch cost dominates at small batches; replaying a captured
graph launches them all at once. Kernel launch shapes must be fixed at capture, so the
graphs read static buffers sized for the largest bucket:

    input_ids, positions, slot_mapping  [B] int64
    seq_lens                            [B] int32
    query_start_loc                     [B+1] int32, always arange (one query per row)
    block_tables                        [B, max_blocks_per_seq] int32, a fixed width
    logits                              [B, vocab] float32 (every graph writes here)

and a step of S sequences replays the smallest bucket b >= S: rows [0, S) are the step's,
rows [S, b) are padding (token 0 at position 0, slot_mapping -1 so nothing is written,
seq_len 1 and an all-zero block table row). A padded row therefore reads slot 0 of
block 0 -- whatever a real sequence left there -- and never writes it; its logits are
discarded. Paged attention only reads the blocks a row's seq_len covers, so table
columns past a step's width are never read either (they are kept at 0 anyway).

How a forward pass is recorded and replayed is the capturer's business: on a GPU,
CudaGraphCapturer (torch.cuda.CUDAGraph, one memory pool shared by all buckets, largest
captured first); in tests, EagerCapturer, which replays by calling the function again on
the static buffers, so the padding and bucketing logic runs on CPU.

Memory: the graphs hold the static buffers (static_buffer_bytes, from the same specs the
runner allocates) and a private pool as big as one forward pass of the largest bucket
needs. The ModelRunner reserves both out of gpu_memory_utilization before it sizes the KV
cache (capture comes after), measuring the pool as an eager forward pass of that bucket.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fastllm import ops
from fastllm.model.layers import AttentionMetadata
from fastllm.utils import cdiv, check_positive_int

logger = logging.getLogger(__name__)

# Largest decode batch captured; bigger decode steps run eagerly (their launch overhead
# is small next to their math).
MAX_CAPTURE_BATCH_SIZE = 256


# torch's caching allocator hands out device memory in multiples of this many bytes.
ALLOCATOR_GRANULE = 512


def capture_batch_sizes(max_num_seqs: int, limit: int = MAX_CAPTURE_BATCH_SIZE) -> list[int]:
    """Buckets 1, 2, 4, 8, 16, 24, ... below min(max_num_seqs, limit), then that cap itself."""
    if max_num_seqs <= 0 or limit <= 0:
        raise ValueError(f"max_num_seqs and limit must be positive, got {max_num_seqs}, {limit}")
    cap = min(max_num_seqs, limit)
    candidates = [1, 2, 4] + list(range(8, cap, 8))
    return [b for b in candidates if b < cap] + [cap]


@dataclass(frozen=True)
class CaptureShape:
    """What build_decode_graphs captures for an engine: the buckets and the widths of
    the static buffers."""
    batch_sizes: list
    max_blocks_per_seq: int
    vocab_size: int

    @property
    def max_batch_size(self) -> int:
        return max(self.batch_sizes)


def capture_shape(model_config, engine_config) -> CaptureShape:
    """The buckets (from max_num_seqs) and block-table width (max_seq_len_to_capture,
    capped at max_model_len) an engine's decode graphs are captured for."""
    max_len = engine_config.max_seq_len_to_capture
    if engine_config.max_model_len is not None:
        max_len = min(max_len, engine_config.max_model_len)
    return CaptureShape(batch_sizes=capture_batch_sizes(engine_config.max_num_seqs),
                        max_blocks_per_seq=cdiv(max_len, engine_config.block_size),
                        vocab_size=model_config.vocab_size)


def static_buffer_specs(max_batch_size: int, max_blocks_per_seq: int,
                        vocab_size: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """name -> (shape, dtype) of every static buffer a DecodeGraphRunner allocates (see
    the module docstring); the one place their sizes are written down."""
    b = max_batch_size
    return {"input_ids": ((b,), torch.int64),
            "positions": ((b,), torch.int64),
            "slot_mapping": ((b,), torch.int64),
            "seq_lens": ((b,), torch.int32),
            "query_start_loc": ((b + 1,), torch.int32),
            "block_tables": ((b, max_blocks_per_seq), torch.int32),
            "logits": ((b, vocab_size), torch.float32)}


def static_buffer_bytes(max_batch_size: int, max_blocks_per_seq: int, vocab_size: int) -> int:
    """Device bytes the static buffers take: each tensor's bytes rounded up to the caching
    allocator's granule (a tensor over 1 MiB may hold up to 1 MiB more, when the allocator
    does not split the rest of its 2 MiB-rounded segment off; the budget's per-tensor
    slack covers that)."""
    total = 0
    for shape, dtype in static_buffer_specs(max_batch_size, max_blocks_per_seq, vocab_size).values():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        total += cdiv(nbytes, ALLOCATOR_GRANULE) * ALLOCATOR_GRANULE
    return total


def make_static_buffers(max_batch_size: int, max_blocks_per_seq: int, vocab_size: int,
                        device) -> dict[str, torch.Tensor]:
    """The static buffers, holding padding (token 0 at position 0, slot -1, seq_len 1, an
    all-zero table row; query_start_loc = arange, which never changes)."""
    specs = static_buffer_specs(max_batch_size, max_blocks_per_seq, vocab_size)
    fill = {"slot_mapping": -1, "seq_lens": 1}
    bufs = {name: torch.full(shape, fill.get(name, 0), dtype=dtype, device=device)
            for name, (shape, dtype) in specs.items()}
    bufs["query_start_loc"].copy_(torch.arange(max_batch_size + 1, dtype=torch.int32))
    return bufs


class CudaGraphCapturer:
    """capture(fn) -> replay(): fn's kernels recorded into a torch.cuda.CUDAGraph.

    fn is warmed up on a side stream first (lazy cuBLAS/allocator set-up must not happen
    inside a capture). All graphs share one memory pool: each frees its intermediates
    when its capture ends, so the next capture reuses them; graphs never run
    concurrently, so sharing is safe. Capture the largest batch first."""

    def __init__(self, device: torch.device, num_warmups: int = 2):
        self.device = torch.device(device)
        self.num_warmups = num_warmups
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list = []
        # One warm-up stream for every capture: the caching allocator keeps freed blocks
        # per stream, so each bucket's warm-up reuses the last one's memory.
        self.warmup_stream = torch.cuda.Stream(self.device)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        # Everything on self.device: torch's capture stream is made on the *current*
        # device, and kernels launched on another device's stream would escape the capture.
        with torch.cuda.device(self.device):
            side = self.warmup_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.num_warmups):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            # Captured on the warm-up stream: its cuBLAS workspace already exists (outside
            # the pool) instead of a fresh one for torch's own capture stream.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.warmup_stream):
                fn()
            torch.cuda.synchronize(self.device)
        self.graphs.append(graph)

        def replay() -> None:
            with torch.cuda.device(self.device):
                graph.replay()
        return replay


class EagerCapturer:
    """Test stand-in for CudaGraphCapturer: capture runs fn once (the warm-up), replay
    runs it again on whatever the static buffers then hold."""

    def __init__(self):
        self.num_captures = 0

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()
        self.num_captures += 1
        return fn


def can_capture(device) -> bool:
    """CUDA graphs need a GPU and fastllm's CUDA kernels: the torch reference kernels read
    sizes back to the host, which a capture forbids."""
    return torch.device(device).type == "cuda" and ops.cuda_available()


def model_capturable(model_config) -> bool:
    """Whether every op of a decode step runs a CUDA kernel for this model: the torch
    reference paged attention (a head_dim with no CUDA kernel) reads sizes back to the host,
    so its capture would fail (and leave the allocator mid-capture)."""
    return ops.cuda_paged_attention_supports(model_config.head_dim)


def graphs_enabled(engine_config, device, model_config=None) -> bool:
    """Whether build_decode_graphs will try to capture (what the KV sizing reserves for)."""
    return (not engine_config.enforce_eager and can_capture(device)
            and (model_config is None or model_capturable(model_config)))


def make_capturer(device: torch.device):
    """The capturer for a device: CUDA graphs where can_capture, None (run eagerly)
    elsewhere. Tests replace this function to run the graph logic on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not can_capture(device):
        logger.info("fastllm._C has no CUDA kernels here; decode steps run eagerly (no CUDA graphs)")
        return None
    return CudaGraphCapturer(device)


class DecodeGraphRunner:
    """Captured decode forward passes, one per bucket of batch sizes, over static buffers.

        runner = DecodeGraphRunner(model, kv_caches, batch_sizes=[1, 2, 4, 8], ...)
        runner.capture()                                   # raises if any capture fails
        if runner.can_run(input_ids, meta):
            logits = runner.run(input_ids, positions, meta)  # [S, vocab], a view of a static buffer

    The returned logits are overwritten by the next run(); consume them first (the
    sampler does, in the same step)."""

    def __init__(self, model, kv_caches: list, *, batch_sizes: list[int], max_blocks_per_seq: int,
                 vocab_size: int, device: torch.device, capturer):
        if not batch_sizes or any(b <= 0 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        check_positive_int("max_blocks_per_seq", max_blocks_per_seq)
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_batch_size = self.batch_sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = torch.device(device)
        self.capturer = capturer
        # Padding values throughout (see the module docstring); query_start_loc never changes.
        bufs = make_static_buffers(self.max_batch_size, max_blocks_per_seq, vocab_size, self.device)
        self.input_ids, self.positions = bufs["input_ids"], bufs["positions"]
        self.slot_mapping, self.seq_lens = bufs["slot_mapping"], bufs["seq_lens"]
        self.query_start_loc, self.block_tables = bufs["query_start_loc"], bufs["block_tables"]
        self.logits = bufs["logits"]
        self._replays: dict[int, Callable[[], None]] = {}
        # Rows [0, _dirty_rows) and table columns [0, _dirty_width) may hold a past step's
        # values; everything outside is padding.
        self._dirty_rows = 0
        self._dirty_width = 0
        self.replay_counts: collections.Counter = collections.Counter()   # bucket -> replays

    def _forward_fn(self, b: int) -> Callable[[], None]:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:b],
                                 block_tables=self.block_tables[:b],
                                 seq_lens=self.seq_lens[:b],
                                 query_start_loc=self.query_start_loc[:b + 1],
                                 max_query_len=1)
        input_ids, positions, logits = self.input_ids[:b], self.positions[:b], self.logits[:b]

        def forward() -> None:
            logits.copy_(self.model(input_ids, positions, self.kv_caches, meta))
        return forward

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first. The buffers hold padding meanwhile, so the
        warm-up runs write nothing to the KV cache."""
        for b in reversed(self.batch_sizes):
            self._replays[b] = self.capturer.capture(self._forward_fn(b))

    def release(self) -> None:
        """Drop the captured graphs: their replay closures refer back to this runner (a
        reference cycle), so without this its buffers wait for the cycle collector."""
        self._replays.clear()

    def bucket_for(self, num_seqs: int) -> int:
        for b in self.batch_sizes:
            if b >= num_seqs:
                return b
        raise ValueError(f"num_seqs={num_seqs} exceeds the largest captured batch ({self.max_batch_size})")

    def can_run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """A pure one-token-per-sequence step (T == S; every scheduled sequence feeds at
        least one token) that fits the buffers. Shapes only: no host sync."""
        num_seqs = meta.seq_lens.shape[0]
        return (input_ids.shape[0] == num_seqs and 0 < num_seqs <= self.max_batch_size
                and meta.block_tables.shape[1] <= self.max_blocks_per_seq
                and len(self._replays) == len(self.batch_sizes))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Copy the step into the static buffers (device-side, no host sync), replay the
        bucket's graph, return logits [S, vocab]."""
        num_seqs = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        b = self.bucket_for(num_seqs)
        if self._dirty_rows > num_seqs:        # a bigger past step: its rows become padding again
            rows = slice(num_seqs, self._dirty_rows)
            self.input_ids[rows].zero_()
            self.positions[rows].zero_()
            self.slot_mapping[rows].fill_(-1)
            self.seq_lens[rows].fill_(1)
            self.block_tables[rows, :self._dirty_width].zero_()
        if self._dirty_width > width:          # a wider past table: clear its tail
            self.block_tables[:num_seqs, width:self._dirty_width].zero_()
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        self._dirty_rows, self._dirty_width = num_seqs, width
        self._replays[b]()
        self.replay_counts[b] += 1
        return self.logits[:num_seqs]


def build_decode_graphs(model, kv_caches: list, model_config, engine_config, device,
                        capturer=None) -> Optional[DecodeGraphRunner]:
    """A captured DecodeGraphRunner, or None (run eagerly) when enforce_eager is set, the
    device has no capturer, or capturing fails -- graphs are an optimisation and never
    stop the engine from starting."""
    if engine_config.enforce_eager:
        return None
    if capturer is None and torch.device(device).type == "cuda" and not model_capturable(model_config):
        logger.info("head_dim %d has no CUDA paged attention kernel; decode steps run eagerly",
                    model_config.head_dim)
        return None
    capturer = capturer if capturer is not None else make_capturer(device)
    if capturer is None:
        return None
    shape = capture_shape(model_config, engine_config)
    runner = None
    start = time.perf_counter()
    try:
        runner = DecodeGraphRunner(
            model, kv_caches, batch_sizes=shape.batch_sizes,
            max_blocks_per_seq=shape.max_blocks_per_seq, vocab_size=shape.vocab_size,
            device=device, capturer=capturer)
        runner.capture()
    except Exception as e:  # noqa: BLE001 -- any failure means: run eagerly
        logger.warning("CUDA graph capture failed (%s: %s); running decode steps eagerly",
                       type(e).__name__, e)
        runner = None
    if runner is None:
        # Outside the except block: the exception's traceback no longer pins the runner's
        # static buffers and graph pool, so their memory can go back to the allocator.
        del capturer
        if torch.device(device).type == "cuda":
            try:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
        return None
    if torch.device(device).type == "cuda":
        # The warm-ups ran outside the graphs' pool: give their cached blocks back, so what
        # capture keeps is the pool and the static buffers, as the KV sizing reserved.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    logger.info("Captured decode graphs for batch sizes %s (tables of %d blocks) in %.1f s",
                runner.batch_sizes, runner.max_blocks_per_seq, time.perf_counter() - start)
    return runner
