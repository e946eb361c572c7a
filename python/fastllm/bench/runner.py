"""Helpers the bench subcommands share: timing, progress bars, OOM detection, JSON out."""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable, Iterable, Optional

import torch


def device_defaults(on_gpu: bool):
    """pick(value, gpu, cpu): a flag's value when given, else its GPU or CPU default."""
    return lambda value, gpu, cpu: value if value is not None else (gpu if on_gpu else cpu)


def add_engine_arguments(parser) -> None:
    """The engine knobs every bench that runs LLMEngine takes."""
    g = parser.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (no CUDA graphs for decode steps)")


def engine_config_from_args(args):
    """The EngineConfig of add_engine_arguments' flags (+ --enforce-eager and --seed)."""
    from fastllm.config import EngineConfig
    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
                        enforce_eager=args.enforce_eager, seed=args.seed)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "it"):
    """A tqdm bar on stderr when it is a terminal (disable=None), silent in logs and CI."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False)


def time_op(fn: Callable[[], object], device: torch.device, warmup: int = 3,
            iters: int = 10) -> tuple[list, object]:
    """Seconds per call of fn, `iters` times after `warmup` calls, and fn's last result.

    CUDA: each call between two CUDA events on the current stream (GPU time, no host
    overhead once the queue is full). CPU: perf_counter around each call. The result is
    returned so callers check it and nothing can be skipped as dead code."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got warmup={warmup}, iters={iters}")
    device = torch.device(device)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            out = fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, out


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def is_oom(exc: BaseException) -> bool:
    """A device or host allocation failure (as opposed to a bug)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def write_json(path: str, obj) -> str:
    """Write obj as indented JSON (NaN/inf become null: strict JSON parsers reject them)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_finite(obj), f, indent=2)
        f.write("\n")
    return path


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
