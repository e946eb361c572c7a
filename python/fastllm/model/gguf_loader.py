"""Load a Llama-family GGUF file (llama.cpp's format): metadata -> ModelConfig, tensors
dequantized at load (gguf.quants: Q4_0/Q4_1/Q8_0/F16/F32/BF16/K-quants...) into the
same fused model a Hugging Face directory gives.

llama.cpp's converter permutes the rows of LLaMA-arch Q and K weights (from HF's
rotate-half RoPE layout to its interleaved one); they are permuted back here so the
model applies HF-style RoPE to both sources. Qwen2 GGUFs keep HF's layout.
"""
from __future__ import annotations

import functools
import math
import os
import re

import numpy as np
import torch

from fastllm.config import ModelConfig

# general.architecture -> (HF architecture, whether Q/K rows were permuted by the converter)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),   # also Mistral/SmolLM2 GGUFs
    "qwen2": ("Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def load_gguf_model(path: str, dtype="auto", device="cpu", parallel=None):
    """-> (model, ModelConfig) from a .gguf file; with `parallel` (a ParallelContext),
    this rank's shard: its stage's tensors dequantized whole, then sliced by load_weights."""
    from fastllm.model.layers import rope_inv_freq
    from fastllm.model.loader import build_empty_model, load_weights, resolve_dtype

    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    _check_shapes(reader, config, path)
    device = torch.device(device)
    model = build_empty_model(config, resolve_dtype(dtype, device), device, parallel)
    load_weights(model, _iter_hf_tensors(reader, config, path, model.holds_weight), source=path)
    rope_freqs = _find_tensor(reader, "rope_freqs.weight")
    if rope_freqs is not None:
        # Llama 3.1 GGUFs carry the rope scaling as per-frequency divisors.
        factors = torch.from_numpy(np.array(_dequantize(rope_freqs, path), dtype=np.float32))
        model.rotary.set_inv_freq((rope_inv_freq(config) / factors.flatten()).to(device))
    return model, config


def config_from_gguf(reader, path: str = "<gguf>") -> ModelConfig:
    """ModelConfig from GGUF metadata ({arch}.* hyperparameters). Token ids (bos, eos,
    end-of-generation) are the tokenizer's business: fastllm.tokenizer.gguf_vocab reads them.
    Every value is type-checked here: errors name the metadata key."""
    arch = _value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported; "
                         f"supported: {', '.join(_ARCHITECTURES)}")
    architecture, _ = _ARCHITECTURES[arch]

    def get(key, default=None, kind="int"):
        full = f"{arch}.{key}"
        value = _value(reader, full)
        if value is None:
            if default is None:
                raise ValueError(f"{path}: required metadata {full} is missing")
            return default
        if key == "attention.head_count_kv" and isinstance(value, list) and value:
            # per-layer list; the Llama family uses one value
            if len(set(value)) != 1:
                raise ValueError(f"{path}: per-layer {full} is not supported")
            value = value[0]
        return _checked_number(value, kind, full, path)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    head_dim = get("attention.key_length", hidden // heads)
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary ({arch}.rope.dimension_count={rope_dim} "
                         f"< head_dim {head_dim}) is not supported")

    rope_scaling = None
    scaling_type = _value(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor", kind="float")}
    elif scaling_type not in ("none", None):
        raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling_type!r} is not supported")
    return _model_config(
        path,
        architecture=architecture,
        vocab_size=_vocab_size(reader, path),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6, kind="float"),
        rope_theta=get("rope.freq_base", 10000.0, kind="float"),
        rope_scaling=rope_scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings=_find_tensor(reader, "output.weight") is None,
        attention_bias=architecture == "Qwen2ForCausalLM",
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        pad_token_id=_value(reader, "tokenizer.ggml.padding_token_id"),
    )


def _vocab_size(reader, path: str) -> int:
    embed = _find_tensor(reader, "token_embd.weight")
    if embed is None:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    if len(embed.shape) != 2:
        raise ValueError(f"{path}: tensor 'token_embd.weight' has {len(embed.shape)} dims, expected 2")
    return int(embed.shape[1])  # ggml order: ne[0] = hidden, ne[1] = vocab


def _checked_number(value, kind: str, key: str, path: str):
    """A metadata value as an int (kind="int", > 0) or a float; ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: metadata {key} must be a number, got {value!r}")
    if kind == "int":
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{path}: metadata {key} must be a positive integer, got {value!r}")
        return value
    if not math.isfinite(value):
        raise ValueError(f"{path}: metadata {key} must be finite, got {value!r}")
    return float(value)


def _model_config(path: str, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ModelConfig field -> its GGUF key (after "{arch}."), for error messages.
_GGUF_FIELDS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                "num_attention_heads": "attention.head_count",
                "num_key_value_heads": "attention.head_count_kv",
                "head_dim": "attention.key_length", "num_hidden_layers": "block_count",
                "vocab_size": "token_embd.weight rows"}


def _check_shapes(reader, config: ModelConfig, path: str) -> None:
    """Every tensor against the metadata before the model is allocated (llama.cpp's
    rule): an inconsistent file fails in milliseconds."""
    from fastllm.model.checkpoint_shapes import check_tensor_shapes
    arch = _value(reader, "general.architecture")
    shapes, display = {}, {}
    for tensor in reader.tensors:
        name = _hf_name(tensor, path)
        if name is None:
            if tensor.name == "rope_freqs.weight" and int(tensor.n_elements) != config.head_dim // 2:
                raise ValueError(f"{path}: tensor 'rope_freqs.weight' has {int(tensor.n_elements)} "
                                 f"values, expected head_dim / 2 = {config.head_dim // 2}")
            continue
        shapes[name] = tuple(int(d) for d in reversed(tensor.shape))
        display[name] = tensor.name
    fields = {f: (f"{arch}.{k}" if not k.startswith("token_embd") else k) for f, k in _GGUF_FIELDS.items()}
    check_tensor_shapes(shapes, config, path, display=display, fields=fields)


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> HF checkpoint name (None for tensors handled elsewhere)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a Llama-family model")


def _hf_name(tensor, path: str) -> str | None:
    try:
        return hf_tensor_name(tensor.name)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's `permute`: per head, rows (pair j, half a) stored as
    j*2 + a go back to HF's a*(head_dim/2) + j. Works for weights [rows, in] and biases [rows]."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _iter_hf_tensors(reader, config: ModelConfig, path: str, wanted=lambda name: True):
    """(HF name, float32 tensor) of each tensor `wanted` (others are not dequantized)."""
    arch = _value(reader, "general.architecture")
    permuted = _ARCHITECTURES[arch][1]
    for tensor in reader.tensors:
        name = _hf_name(tensor, path)
        if name is None or not wanted(name):
            continue
        weight = torch.from_numpy(np.array(_dequantize(tensor, path), dtype=np.float32))
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_qk(weight, config.num_key_value_heads)
        yield name, weight


def _dequantize(tensor, path: str) -> np.ndarray:
    """float32 array in torch's dimension order (GGUF lists dims innermost first)."""
    from gguf.quants import dequantize
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                         f"which cannot be dequantized ({e})") from None
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def open_gguf(path):
    """A GGUFReader on `path` (memory-mapped); errors name the file."""
    path = os.fspath(path)
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("reading GGUF files needs the 'gguf' package (pip install gguf)") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    stat = os.stat(path)
    try:
        return _read_gguf(path, stat.st_mtime_ns, stat.st_size)
    except MemoryError:
        raise                  # not the file's fault as far as we can tell: do not disguise it
    except Exception as e:
        raise ValueError(f"{path}: corrupt or unreadable GGUF file ({e})") from e


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, mtime_ns: int, size: int):
    # Parsing a GGUF's index takes seconds; the model and the tokenizer both read the same
    # file at load, so the (memory-mapped, read-only) reader is shared while unchanged.
    # The reader trusts every count and offset in the file: check them against the file
    # size first (a count past the end would make it loop forever).
    from gguf import GGUFReader
    from fastllm.model.gguf_check import check_gguf_file
    check_gguf_file(path)
    return GGUFReader(path, "r")


def _find_tensor(reader, name: str):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    return None


def _value(reader, key: str, default=None):
    """A metadata value (see field_value), or `default` when absent."""
    field = reader.get_field(key)
    return default if field is None else field_value(field)


def field_value(field):
    """A GGUF metadata field as a Python str/int/float/bool, or a list of them for an
    array. Strings are UTF-8; one that is not valid on its own (a vocabulary piece cut
    inside a character) is decoded with U+FFFD rather than failing."""
    from gguf import GGUFValueType

    def decode(part, value_type):
        if value_type == GGUFValueType.STRING:
            return [bytes(part).decode("utf-8", errors="replace")]
        return part.tolist()

    if field.types[0] == GGUFValueType.ARRAY:
        return [v for i in field.data for v in decode(field.parts[i], field.types[-1])]
    return decode(field.parts[field.data[0]], field.types[0])[0]


def read_metadata(reader, prefixes: tuple = ()) -> dict:
    """{key: value} of every metadata field (only those whose key starts with one of
    `prefixes`, when given)."""
    return {key: field_value(f) for key, f in reader.fields.items()
            if not prefixes or key.startswith(prefixes)}
