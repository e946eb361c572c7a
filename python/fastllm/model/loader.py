"""Load a model: a Hugging Face directory (config.json + safetensors) or a GGUF file.

Weights stream one tensor at a time (safetensors `safe_open` memory-maps the file)
straight into parameters created on the meta device and materialised once on the
target device, so a checkpoint is never held in memory twice.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Iterable, Iterator, Union

import torch

from fastllm.config import ModelConfig
from fastllm.model.llama import LlamaForCausalLM

SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Checkpoint entries that are not weights (old Llama conversions store rope buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(path: Union[str, os.PathLike], dtype: Union[torch.dtype, str] = torch.float32,
               device: Union[str, torch.device] = "cpu"):
    """-> (model in eval mode, ModelConfig). `path`: an HF model directory or a .gguf file.
    dtype may be a torch dtype, a name ("bfloat16", ...) or "auto" (the checkpoint's own
    dtype from config.json; float32 when it names none, e.g. GGUF)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    device = torch.device(device)
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise ValueError(f"model file {path!r} is not a GGUF file (expected a .gguf file "
                             f"or a directory with config.json and *.safetensors)")
        from fastllm.model.gguf_loader import load_gguf_model
        return load_gguf_model(path, dtype=dtype, device=device)

    config = ModelConfig.from_hf_dir(path)
    files = safetensors_files(path)
    model = build_empty_model(config, resolve_dtype(dtype, config), device)
    load_weights(model, _iter_safetensors(files, device), source=path)
    return model, config


def resolve_dtype(dtype: Union[torch.dtype, str], config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        return _DTYPES.get(str(config.dtype).replace("torch.", ""), torch.float32)
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def build_empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The model with uninitialised weights on `device` (no random init: every weight
    is then overwritten by load_weights, which checks that none is missing)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gives the shared parameter two storages; re-share
    from fastllm.model.layers import rope_inv_freq
    model.rotary.set_inv_freq(rope_inv_freq(config).to(device))
    return model.eval()


def load_weights(model: LlamaForCausalLM, named_tensors: Iterable, source: str) -> None:
    """Copy (HF name, tensor) pairs into the model's (possibly fused) parameters.

    Errors name the tensor: unknown name, shape mismatch, duplicate, missing. A missing
    lm_head.weight ties the LM head to the embeddings."""
    targets = model.checkpoint_weights()
    loaded = set()
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if name not in targets:
                raise ValueError(f"{source}: unexpected tensor {name!r} for "
                                 f"{model.config.architecture} (wrong architecture in config.json?)")
            if name in loaded:
                raise ValueError(f"{source}: tensor {name!r} appears more than once")
            param, rows = targets[name]
            dest = param if rows is None else param[rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)} from the config")
            dest.copy_(tensor)
            loaded.add(name)
    missing = [n for n in targets if n not in loaded]
    if missing == ["lm_head.weight"]:
        model.tie_weights()
        missing = []
    if missing:
        shown = ", ".join(missing[:8]) + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(f"{source}: missing tensors: {shown}")


def safetensors_files(path: str) -> list:
    """The checkpoint's shards: those the index names, else every *.safetensors."""
    index_file = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index_file):
        try:
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_file}: not a valid safetensors index ({e!r})") from e
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {os.path.basename(file)!r} listed in {index_file} "
                                        f"does not exist")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in model directory {path!r}")
    return files


def _iter_safetensors(files: list, device: torch.device) -> Iterator:
    from safetensors import safe_open
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device=str(device))
        except Exception as e:  # SafetensorError (bad header), OSError, ...
            raise ValueError(f"{file}: corrupt or unreadable safetensors file ({e})") from e
        with handle as f:
            for name in f.keys():
                try:
                    tensor = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from e
                yield name, tensor


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
