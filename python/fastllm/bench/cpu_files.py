"""The GGUF files `bench cpu` derives from its model for the other precisions, made once
with llama.cpp's own quantizer (llama_cpp.llama_model_quantize, a benchmark-only
dependency) into the cache, never the repo:

  F32     every tensor dequantized to float32 (llama.cpp's F32 row: the same values
          fastllm-f32 dequantizes the source to, so greedy tokens can be compared)
  Q4_K_M  llama.cpp's usual mix (Q4_K / Q6_K, and its fallbacks such as Q5_0 / Q8_0 for
          rows whose length is not a multiple of 256), quantized from the F32 file
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from fastllm import envs

# llama.cpp's llama_ftype values.
_FTYPES = {"F32": 0, "Q4_K_M": 15}


def derived_path(source: str, kind: str) -> Path:
    """Where the `kind` file of `source` lives in the cache."""
    if kind not in _FTYPES:
        raise ValueError(f"kind must be one of {', '.join(_FTYPES)}, got {kind!r}")
    stem = Path(source).name.removesuffix(".gguf")
    return Path(envs.FASTLLM_CACHE) / "bench" / f"{stem}.{kind}.gguf"


def derived_gguf(source: str, kind: str, threads: int = 2) -> str:
    """The `kind` file of `source`, made when missing (ImportError without llama_cpp)."""
    target = derived_path(source, kind)
    if target.exists():
        return str(target)
    import llama_cpp
    src = derived_gguf(source, "F32", threads) if kind == "Q4_K_M" else source
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPES[kind]
    params.allow_requantize = True   # the source's blocks are dequantized first
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {kind}) failed with code {rc}")
    os.replace(partial, target)
    return str(target)
