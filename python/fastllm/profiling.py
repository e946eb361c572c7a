"""Tracing helpers: NVTX ranges for Nsight Systems, torch.profiler traces for `--profile DIR`.

    with nvtx_range("forward"): ...          # or @nvtx_range("schedule") on a function
    with maybe_profile(args.profile): ...    # writes DIR/<worker>.<ts>.pt.trace.json

NVTX backend, chosen once: the `nvtx` package when importable (a push/pop costs well
under a microsecond when no profiler is attached), else torch.cuda.nvtx when CUDA is
available, else nothing. Ranges land in NVTX's default domain, the same one the C++
launchers use, so `nsys` shows Python stages and kernel launchers on one timeline row.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

__all__ = ["nvtx_range", "nvtx_backend", "maybe_profile", "profiler_summary"]


@functools.lru_cache(maxsize=None)
def nvtx_backend() -> str:
    """'nvtx' (the PyPI package), 'torch' (torch.cuda.nvtx) or 'none'."""
    try:
        import nvtx  # noqa: F401
        return "nvtx"
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return "torch"
    except ImportError:
        pass
    return "none"


class nvtx_range(contextlib.ContextDecorator):
    """A named NVTX range, usable as `with nvtx_range(name):` or `@nvtx_range(name)`.
    Push/pop are stack-based, so one instance may be re-entered (recursion, decorators)."""

    def __init__(self, name: str, color: Optional[str] = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"nvtx_range name must be a non-empty string, got {name!r}")
        self.name = name
        self.color = color

    def __enter__(self):
        backend = nvtx_backend()
        if backend == "nvtx":
            import nvtx
            nvtx.push_range(message=self.name, color=self.color)
        elif backend == "torch":
            import torch
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        backend = nvtx_backend()
        if backend == "nvtx":
            import nvtx
            nvtx.pop_range()
        elif backend == "torch":
            import torch
            torch.cuda.nvtx.range_pop()
        return False


@contextlib.contextmanager
def maybe_profile(trace_dir: Optional[str], *, record_shapes: bool = True,
                  with_stack: bool = False, worker_name: str = "fastllm"):
    """torch.profiler over the block when trace_dir is set, else nothing (yields None).

    The trace (`trace_dir/<worker_name>.<timestamp>.pt.trace.json`) opens in Perfetto
    (ui.perfetto.dev), chrome://tracing, or TensorBoard (`tensorboard --logdir DIR` with
    torch-tb-profiler). CUDA activity is recorded when a GPU is present."""
    if trace_dir is None:
        yield None
        return
    trace_dir = os.fspath(trace_dir)
    if os.path.exists(trace_dir) and not os.path.isdir(trace_dir):
        raise ValueError(f"--profile {trace_dir!r} exists and is not a directory")
    os.makedirs(trace_dir, exist_ok=True)
    import torch
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=record_shapes, with_stack=with_stack,
                 on_trace_ready=tensorboard_trace_handler(trace_dir, worker_name=worker_name)) as prof:
        yield prof


def profiler_summary(prof, row_limit: int = 15) -> str:
    """The top ops of a finished profile by device time (CPU time when no GPU ran)."""
    import torch
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
