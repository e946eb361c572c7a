"""Every FASTLLM_* environment variable, in one table, read when asked for (never at
import), so a test or a launcher can set one after `import fastllm`.

    from fastllm import envs
    envs.FASTLLM_CACHE      # the current value, parsed
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional


def _str_or_none(name: str) -> Callable[[], Optional[str]]:
    return lambda: os.environ.get(name) or None


def _positive_float(name: str, default: float) -> Callable[[], float]:
    def read() -> float:
        raw = os.environ.get(name) or str(default)
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name}={raw!r}: expected a positive number of seconds")
        return value
    return read


def _choice(name: str, default: str, choices: tuple[str, ...]) -> Callable[[], str]:
    def read() -> str:
        value = os.environ.get(name, default) or default
        if value not in choices:
            raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value
    return read


_VARIABLES: dict[str, Callable[[], Any]] = {
    # Where the default model's wheel is fetched to (DESIGN §1).
    "FASTLLM_CACHE": lambda: Path(os.environ.get("FASTLLM_CACHE") or Path.home() / ".cache" / "fastllm"),
    # Prefill attention on CUDA: fastllm's tensor-core kernel, or torch's paged varlen flash attention.
    "FASTLLM_PREFILL_BACKEND": _choice("FASTLLM_PREFILL_BACKEND", "fastllm", ("fastllm", "torch")),
    # libnccl to open at run time instead of the one torch's CUDA wheels ship.
    "FASTLLM_NCCL_SO": _str_or_none("FASTLLM_NCCL_SO"),
    # Pipeline stages' layer counts, e.g. "3,2" (else as even as possible), like vLLM's
    # VLLM_PP_LAYER_PARTITION.
    "FASTLLM_PP_LAYER_PARTITION": _str_or_none("FASTLLM_PP_LAYER_PARTITION"),
    # Seconds a parallel step may wait on another rank (a collective of the model, a
    # worker's reply) before the driver declares that rank hung and shuts the group down.
    "FASTLLM_STEP_TIMEOUT": _positive_float("FASTLLM_STEP_TIMEOUT", 300.0),
    # 1: with pipeline_parallel_size = M, keep up to M steps in flight (microbatches);
    # 0: one step at a time (the bubble, for measuring it). auto: 1 on CPU (gloo, tested);
    # 0 on CUDA until NCCL's ordering of one stream's sends and receives between facing
    # stages is checked on a multi-GPU machine (it may deadlock with steps in flight).
    "FASTLLM_PP_MICROBATCHES": _choice("FASTLLM_PP_MICROBATCHES", "auto", ("auto", "0", "1")),
    # 1: a CPU model's decoder layers run as one C++ call per step (model/cpu_decoder.py);
    # 0: layer by layer through the torch modules (the reference path, for comparison).
    "FASTLLM_CPU_DECODER": _choice("FASTLLM_CPU_DECODER", "1", ("0", "1")),
    # 1: the CPU kernels of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q6_K weights round the activations
    # to int8 blocks, row by row (llama.cpp's arithmetic, about 2x fewer instructions); 0:
    # exact fp32 activations. Applied when a GGUF model is loaded kept quantized.
    "FASTLLM_CPU_INT8_ACTIVATIONS": _choice("FASTLLM_CPU_INT8_ACTIVATIONS", "1", ("0", "1")),
    # The server's API key when --api-key is not given.
    "FASTLLM_API_KEY": _str_or_none("FASTLLM_API_KEY"),
}


def __getattr__(name: str) -> Any:
    if name in _VARIABLES:
        return _VARIABLES[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_VARIABLES)
