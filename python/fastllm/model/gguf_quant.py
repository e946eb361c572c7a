"""Load a GGUF file with its linear weights kept as stored (quantization="gguf").

The projections (q|k|v, o, gate|up, down, and the LM head, which for tied embeddings
reads token_embd's blocks) become QuantLinear over the file's raw blocks, copied out of
the memory map as uint8 [rows, row_bytes] after checking them against the config and the
block size. Everything else (embeddings for lookup, norms, biases, rope factors) and any
linear weight in a type the kernels lack is dequantized exactly as gguf_loader does.
Kept apart from gguf_loader.py so that file's own loading path stays as it is.
"""
from __future__ import annotations

import numpy as np
import torch

from fastllm import envs, ops, reference
from fastllm.model import gguf_loader
from fastllm.model.quant_linear import QuantLinear

# HF name suffix -> (module path under a layer, fused part) for the decoder's projections
_PROJECTIONS = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj.weight": ("self_attn.o_proj", 0),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj", 1),
    "mlp.down_proj.weight": ("mlp.down_proj", 0),
}


def raw_blocks(tensor, expected_shape: tuple, path: str) -> torch.Tensor:
    """A GGUF tensor's bytes as uint8 [rows, row_bytes], checked: the tensor's dims equal
    expected_shape (rows, in_features) from the config, in_features is a whole number of
    blocks and the byte count is rows * in_features / block_elems * block_bytes."""
    ggml_type = int(tensor.tensor_type)
    block_elems, block_bytes = reference.GGML_BLOCKS[ggml_type]
    dims = tuple(int(d) for d in reversed(tensor.shape))   # torch order: (rows, in_features)
    if len(dims) != 2 or dims != tuple(expected_shape):
        raise ValueError(f"{path}: tensor {tensor.name!r} has shape {dims}, expected {tuple(expected_shape)} "
                         f"from the config")
    rows, in_features = dims
    if in_features % block_elems:
        raise ValueError(f"{path}: tensor {tensor.name!r} has {in_features} columns, not a multiple of "
                         f"{tensor.tensor_type.name}'s block of {block_elems}")
    data = np.asarray(tensor.data)
    row_bytes = in_features // block_elems * block_bytes
    if data.nbytes != rows * row_bytes:
        raise ValueError(f"{path}: tensor {tensor.name!r} holds {data.nbytes} bytes, expected "
                         f"{rows * row_bytes} for {rows} x {in_features} {tensor.tensor_type.name}")
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(rows, row_bytes).copy())


def load_gguf_quantized(path: str, dtype="auto", device="cpu"):
    """-> (model, ModelConfig) with QuantLinear projections (see the module doc)."""
    from fastllm.model.layers import rope_inv_freq
    from fastllm.model.loader import build_empty_model, load_weights, resolve_dtype

    reader = gguf_loader.open_gguf(path)
    config = gguf_loader.config_from_gguf(reader, path)
    device = torch.device(device)
    if device.type == "cpu":
        ops.set_cpu_int8_activations(envs.FASTLLM_CPU_INT8_ACTIVATIONS == "1")
    model = build_empty_model(config, resolve_dtype(dtype, device), device)
    targets = model.checkpoint_weights()
    permuted = gguf_loader._ARCHITECTURES[gguf_loader._value(reader, "general.architecture")][1]
    parts, floats, lm_head_source = {}, [], None
    for tensor in reader.tensors:
        try:
            name = gguf_loader.hf_tensor_name(tensor.name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if name is None:
            continue
        keep = int(tensor.tensor_type) in reference.GGML_BLOCKS
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else None
        if keep and suffix in _PROJECTIONS:
            if name not in targets:
                raise ValueError(f"{path}: unexpected tensor {name!r}")
            param, rows = targets[name]
            expected = param.shape if rows is None else param[rows].shape
            blocks = raw_blocks(tensor, tuple(expected), path)
            if permuted and suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = config.num_attention_heads if "q_proj" in suffix else config.num_key_value_heads
                blocks = gguf_loader.unpermute_qk(blocks, heads).contiguous()
            layer = int(name.split(".")[2])
            module, index = _PROJECTIONS[suffix]
            parts.setdefault((layer, module), {})[index] = (int(tensor.tensor_type), blocks, tensor)
            continue
        if keep and name in ("lm_head.weight", "model.embed_tokens.weight"):
            if name == "lm_head.weight" or lm_head_source is None:
                lm_head_source = tensor
        floats.append(tensor)
    floats += _install_projections(model, parts, device)
    lm_head = _lm_head(model, config, lm_head_source, path, device)
    load_weights(model, _dequantized(floats, config, permuted, path), source=path)
    if lm_head is not None:
        model.lm_head = lm_head   # after load_weights, which ties an absent lm_head
    rope_freqs = gguf_loader._find_tensor(reader, "rope_freqs.weight")
    if rope_freqs is not None:
        factors = torch.from_numpy(np.array(gguf_loader._dequantize(rope_freqs, path), dtype=np.float32))
        model.rotary.set_inv_freq((rope_inv_freq(config) / factors.flatten()).to(device))
    return model.eval(), config


def _install_projections(model, parts: dict, device) -> list:
    """Swap each projection whose parts were all kept for a QuantLinear over them. A
    projection with a part in another type (or missing) stays nn.Linear: its tensors are
    returned for the float path, whose load_weights names any missing one."""
    back_to_float = []
    for (layer, module), found in parts.items():
        owner_name, attr = module.rsplit(".", 1)
        owner = model.layers[layer].get_submodule(owner_name)
        linear = getattr(owner, attr)
        expected = 3 if attr == "qkv_proj" else 2 if attr == "gate_up_proj" else 1
        if len(found) != expected:
            back_to_float += [tensor for _, _, tensor in found.values()]
            continue
        segments = _merge_same_type([found[i][:2] for i in range(expected)])
        setattr(owner, attr, QuantLinear(linear.in_features, segments, bias=linear.bias is not None,
                                         device=device))
    return back_to_float


def _merge_same_type(segments: list) -> list:
    """Adjacent parts in the same ggml type become one segment (one kernel call)."""
    merged = []
    for ggml_type, blocks in segments:
        if merged and merged[-1][0] == ggml_type:
            merged[-1] = (ggml_type, torch.cat([merged[-1][1], blocks]))
        else:
            merged.append((ggml_type, blocks))
    return merged


def _lm_head(model, config, tensor, path: str, device):
    """QuantLinear over output.weight (or token_embd.weight when tied), or None."""
    if tensor is None:
        return None
    blocks = raw_blocks(tensor, (config.vocab_size, config.hidden_size), path)
    return QuantLinear(config.hidden_size, [(int(tensor.tensor_type), blocks)], device=device)


def _dequantized(tensors: list, config, permuted: bool, path: str):
    """(HF name, float tensor) for the tensors that are not kept quantized."""
    for tensor in tensors:
        name = gguf_loader.hf_tensor_name(tensor.name)
        weight = torch.from_numpy(np.array(gguf_loader._dequantize(tensor, path), dtype=np.float32))
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = gguf_loader.unpermute_qk(weight, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = gguf_loader.unpermute_qk(weight, config.num_key_value_heads)
        yield name, weight
