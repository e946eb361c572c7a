"""Load a model: a Hugging Face directory (config.json + safetensors) or a GGUF file,
and the one place "auto" devices and dtypes are resolved (resolve_device, resolve_dtype).

Weights stream one tensor at a time (safetensors `safe_open` memory-maps the file)
straight into parameters created on the meta device and materialised once on the
target device, so a checkpoint is never held in memory twice.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Iterable, Iterator, NamedTuple, Optional, Union

import torch

from fastllm.config import ModelConfig, ParallelConfig
from fastllm.distributed.parallel_state import ParallelContext
from fastllm.distributed.sharding import validate_parallel
from fastllm.model.checkpoint_shapes import IGNORED_SUFFIXES as _IGNORED_SUFFIXES
from fastllm.model.checkpoint_shapes import check_tensor_shapes
from fastllm.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



class LoadedForEngine(NamedTuple):
    model: torch.nn.Module
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype


def load_for_engine(path: Union[str, os.PathLike], dtype: Union[torch.dtype, str] = "auto",
                    device: Union[str, torch.device, None] = "auto",
                    quantization: Optional[str] = "auto",
                    parallel: Optional[ParallelContext] = None) -> LoadedForEngine:
    """What an engine (LLMEngine.from_pretrained, the benchmarks) runs: the model on the
    resolved device in the resolved dtype (see resolve_device / resolve_dtype), its
    weights quantized as `quantization` says (see resolve_quantization); with `parallel`,
    this rank's shard of it."""
    device = resolve_device(device)
    model, config = load_model(path, dtype=dtype, device=device, quantization=quantization,
                               parallel=parallel)
    if device.type == "cpu":  # decode-step linears on fastllm's GEMV (model/cpu_linear.py)
        from fastllm.model.cpu_decoder import install_cpu_decoder
        from fastllm.model.cpu_linear import install_cpu_dense_linears
        install_cpu_dense_linears(model)
        install_cpu_decoder(model)   # ... and the layers as one C++ call (model/cpu_decoder.py)
    return LoadedForEngine(model, config, device, next(model.parameters()).dtype)


QUANTIZATIONS = ("auto", "gguf", None)


def resolve_quantization(quantization: Optional[str], is_gguf: bool) -> Optional[str]:
    """'auto': "gguf" for a GGUF file (its linear weights stay in their blocks), None for
    an HF directory; "gguf": keep a GGUF's blocks; None: dequantize to `dtype` at load."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: choose 'auto', 'gguf' or None")
    if quantization == "auto":
        return "gguf" if is_gguf else None
    if quantization == "gguf" and not is_gguf:
        raise ValueError("quantization='gguf' needs a .gguf model file")
    return quantization


def load_model(path: Union[str, os.PathLike], dtype: Union[torch.dtype, str] = torch.float32,
               device: Union[str, torch.device, None] = "cpu", quantization: Optional[str] = None,
               parallel: Optional[ParallelContext] = None):
    """-> (model in eval mode, ModelConfig). `path`: an HF model directory or a .gguf file.
    dtype: a torch dtype, a name ("bfloat16", ...) or "auto" (see resolve_dtype).
    quantization: see resolve_quantization (None here: dequantized, as before).
    parallel: this rank's TP/PP groups; each rank reads only its part of the weights
    (a GGUF's tensors are dequantized whole, then sliced: parallel ranks keep no blocks)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    device = resolve_device(device)
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise ValueError(f"model file {path!r} is not a GGUF file (expected a .gguf file "
                             f"or a directory with config.json and *.safetensors)")
        quantization = resolve_quantization(quantization, True)
        if quantization == "gguf" and parallel is not None and parallel.world_size > 1:
            # Kept blocks are not split over TP ranks nor PP stages yet.
            logger.info("tensor/pipeline parallel: loading %s dequantized, then this rank's "
                        "slice of it (its GGUF blocks are not kept)", path)
            quantization = None
        if quantization == "gguf":
            from fastllm.model.gguf_quant import load_gguf_quantized
            return load_gguf_quantized(path, dtype=dtype, device=device)
        from fastllm.model.gguf_loader import load_gguf_model
        return load_gguf_model(path, dtype=dtype, device=device, parallel=parallel)
    resolve_quantization(quantization, False)

    config = ModelConfig.from_hf_dir(path)
    files = safetensors_files(path)
    # Every tensor's shape against config.json before anything is allocated.
    check_tensor_shapes(safetensors_shapes(files), config, path)
    model = build_empty_model(config, resolve_dtype(dtype, device, config.dtype), device, parallel)
    load_weights(model, _iter_safetensors(files, device), source=path)
    return model, config


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' (or None): the GPU when torch sees one, else the CPU; else 'cpu' or 'cuda[:N]'.
    A CUDA device always comes back with its index ('cuda' -> 'cuda:<current>'), because
    torch.device('cuda') != torch.device('cuda:0') and tensors report the indexed form."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {str(device)!r} is not a device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA GPU; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: Union[torch.dtype, str], device: Union[str, torch.device],
                  checkpoint_dtype: Optional[str] = None) -> torch.dtype:
    """A torch dtype from a dtype or its name. 'auto': on CUDA the checkpoint's half
    precision (float16 when config.json says float16, else bfloat16, also for GGUF and
    float32 checkpoints); float32 on CPU (half precision there is slow and loses the
    parity with transformers in float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        ckpt = _DTYPES.get(str(checkpoint_dtype).lower().replace("torch.", ""))
        return torch.float16 if ckpt == torch.float16 else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16")
    return _DTYPES[name]


def build_empty_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                      parallel: Optional[ParallelContext] = None):
    """The model (this rank's shard, with `parallel`) with uninitialised weights on
    `device` (no random init: every weight is then overwritten by load_weights, which
    checks that none is missing; only vocabulary padding rows are zeroed here)."""
    if parallel is not None:
        validate_parallel(config, ParallelConfig(parallel.tp.world_size, parallel.pp.world_size))
    with torch.device("meta"):
        model = LlamaForCausalLM(config, parallel)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.tie_weights()  # to_empty gives the shared parameter two storages; re-share
    for module in (model.embed_tokens, model.lm_head):
        if hasattr(module, "num_real_rows"):       # tensor parallel: padded vocabulary rows
            with torch.no_grad():
                module.weight[module.num_real_rows:].zero_()
    from fastllm.model.layers import rope_inv_freq
    model.rotary.set_inv_freq(rope_inv_freq(config).to(device))
    return model.eval()


def load_weights(model: LlamaForCausalLM, named_tensors: Iterable, source: str) -> None:
    """Copy (HF name, tensor or safetensors slice) pairs into the model's (possibly fused)
    parameters: only this rank's part of each (model.checkpoint_shards; a safetensors
    slice reads just that part), none of another pipeline stage's tensors.

    Errors name the tensor: unknown name, shape mismatch, duplicate, missing. A missing
    lm_head.weight ties the LM head to the embeddings."""
    targets = model.checkpoint_weights()
    shards = model.checkpoint_shards()
    loaded = set()
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if name not in targets:
                if not model.holds_weight(name):
                    continue                     # another pipeline stage's
                raise ValueError(f"{source}: unexpected tensor {name!r} for "
                                 f"{model.config.architecture} (wrong architecture in config.json?)")
            if name in loaded:
                raise ValueError(f"{source}: tensor {name!r} appears more than once")
            param, rows = targets[name]
            dest = param if rows is None else param[rows]
            part = read_part(tensor, shards.get(name), source, name)
            if tuple(part.shape) != tuple(dest.shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(part.shape)}, "
                                 f"expected {tuple(dest.shape)} from the config")
            dest.copy_(part)
            loaded.add(name)
    _check_missing(model, targets, loaded, source)


def read_part(tensor, shard: Optional[tuple], source: str, name: str) -> torch.Tensor:
    """tensor (a torch tensor, or a lazy safetensors slice read only here), cut to shard
    = (dim, start, stop) when given. A shard past the tensor's end reads short, so the
    shape check names the mismatch."""
    index = slice(None) if shard is None else (slice(None),) * shard[0] + (slice(shard[1], shard[2]),)
    try:
        return tensor[index]
    except Exception as e:  # a safetensors read error, or fewer dims than the shard's
        raise ValueError(f"{source}: cannot read tensor {name!r} ({e})") from e


def _check_missing(model, targets: dict, loaded: set, source: str) -> None:
    missing = [n for n in targets if n not in loaded]
    if missing == ["lm_head.weight"]:
        if model.embed_tokens is None:
            raise ValueError(f"{source}: lm_head.weight is missing (tied to the embeddings?) and "
                             f"this pipeline stage has no embedding to tie it to; set "
                             f"tie_word_embeddings in config.json")
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


# safetensors' own cap on the JSON header (its MAX_HEADER_SIZE).
_MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors_header(file: str) -> None:
    """The header length (the file's first 8 bytes) against the file size, before the
    library parses it."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{file}: {size} bytes, too short for a safetensors file")
    header_len = int.from_bytes(head, "little")
    if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise ValueError(f"{file}: safetensors header length {header_len} is past the end of the "
                         f"file ({size} bytes) or over {_MAX_SAFETENSORS_HEADER} bytes")


def _open_safetensors(file: str, device: str = "cpu"):
    from safetensors import safe_open
    check_safetensors_header(file)
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as e:  # SafetensorError (bad header), OSError, ...
        raise ValueError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def safetensors_shapes(files: list) -> dict:
    """{tensor name: shape} from the shards' headers (no tensor data is read)."""
    shapes = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                if name in shapes:
                    raise ValueError(f"{file}: tensor {name!r} appears more than once")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _iter_safetensors(files: list, device: torch.device) -> Iterator:
    """(name, lazy slice) pairs: load_weights reads each rank's part of a tensor (or
    none of it) while its file is open, so no rank materialises a whole sharded tensor."""
    for file in files:
        with _open_safetensors(file, str(device)) as f:
            for name in f.keys():
                try:
                    tensor = f.get_slice(name)
                except Exception as e:
                    raise ValueError(f"{file}: cannot read tensor {name!r} ({e})") from e
                yield name, tensor


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
