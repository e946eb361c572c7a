"""Tiny random-weight Hugging Face checkpoints for tests (no hub access, ever).

    path = write_checkpoint(tmp_path, arch="llama", sharded=False, **config_overrides)
    path = cached_checkpoint("qwen2", sharded=True)       # written once per test process
    hf = load_hf_model(path)                                # transformers model, fp32, eval

Each directory is a complete checkpoint: config.json, *.safetensors (sharded with an
index when asked), generation_config.json, tokenizer.json (byte-level BPE trained on a
fixed text) and tokenizer_config.json with a ChatML chat template.

Weights are drawn with a larger std than HF's default (initializer_range 0.2) and
norm weights / biases are randomised too, so greedy generations are not degenerate and
every parameter matters.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2")

# Special tokens in SmolLM2's layout: id 0 pads, 1 begins (bos), 2 ends (eos).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
             initializer_range=0.2, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
             pad_token_id=PAD_ID, hidden_act="silu")

# What each arch exercises: Llama 3.1 GQA with llama3 rope scaling (original length
# small enough that the scaling changes several frequencies), Mistral GQA 4:1, Qwen2
# qkv bias with tied embeddings.
ARCH_DEFAULTS = {
    "llama": dict(num_key_value_heads=2, rope_theta=10000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(num_key_value_heads=1, rope_theta=10000.0, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True),
}

TRAINING_TEXT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "Paged attention stores keys and values in fixed-size blocks; a block table maps "
    "each sequence's logical blocks to physical ones. Once upon a time there was a small "
    "language model that liked to count: one, two, three, four, five, six, seven. "
    "Hello world! How are you today? I am fine, thank you. 0123456789 +-*/=()[]{}"
)


def hf_config(arch: str = "llama", **overrides):
    """The transformers config object of a tiny checkpoint."""
    import transformers
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    kwargs = {**_BASE, **ARCH_DEFAULTS[arch], **overrides}
    return cls(**kwargs)


def write_checkpoint(path, arch: str = "llama", sharded: bool = False, seed: int = 0,
                     tokenizer: bool = True, generation: dict | None = None,
                     **overrides) -> Path:
    """Write a tiny random-weight checkpoint into directory `path` (created) and return it.

    sharded: several *.safetensors shards + model.safetensors.index.json.
    generation: extra generation_config.json fields (e.g. temperature, top_p).
    overrides: config fields (hidden_size=..., tie_word_embeddings=..., ...)."""
    import transformers
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms_and_biases(model, seed)
    model.generation_config = transformers.GenerationConfig(**{
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, **(generation or {})})
    model.save_pretrained(path, max_shard_size="150KB" if sharded else "10GB")
    if sharded and not (path / "model.safetensors.index.json").exists():
        raise AssertionError("save_pretrained did not shard the tiny checkpoint")
    if tokenizer:
        write_tokenizer(path, config.vocab_size)
    return path


def write_tokenizer(path, vocab_size: int) -> None:
    """tokenizer.json (byte-level BPE, at most vocab_size tokens) + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise AssertionError("tokenizer vocabulary exceeds the model's vocab_size")
    tok.save(str(Path(path) / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID], "unk_token": None,
        "add_bos_token": False, "model_max_length": _BASE["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _randomise_norms_and_biases(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


_CACHE_ROOT = None


@functools.lru_cache(maxsize=None)
def _cached(arch, sharded, seed, overrides_json):
    global _CACHE_ROOT
    if _CACHE_ROOT is None:
        _CACHE_ROOT = tempfile.mkdtemp(prefix="fastllm-ckpt-")
        atexit.register(shutil.rmtree, _CACHE_ROOT, True)
    name = f"{arch}-{'sharded' if sharded else 'single'}-{seed}-{abs(hash(overrides_json))}"
    return write_checkpoint(os.path.join(_CACHE_ROOT, name), arch, sharded, seed,
                            **json.loads(overrides_json))


def cached_checkpoint(arch: str = "llama", sharded: bool = False, seed: int = 0,
                      **overrides) -> Path:
    """write_checkpoint into a per-process temp dir, once per distinct argument set.
    Treat the directory as read-only (other tests share it)."""
    return _cached(arch, sharded, seed, json.dumps(overrides, sort_keys=True))


def load_hf_model(path, dtype=torch.float32):
    """The transformers reference model of a checkpoint directory (eval mode, CPU)."""
    import transformers
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------- GGUF
# HF name -> llama.cpp name (what convert_hf_to_gguf.py writes).
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def hf_greedy(hf, prompt, max_new):
    """transformers' greedy continuation of one prompt, up to and including EOS_ID."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, eos_token_id=EOS_ID, pad_token_id=0)
    gen = out[0, len(prompt):].tolist()
    return gen[:gen.index(EOS_ID) + 1] if EOS_ID in gen else gen


def gguf_tensor_type(hf_name: str, ndim: int, tensor_type: str) -> str:
    """The GGUF type a tensor gets: norms/biases stay F32 (as llama.cpp keeps them);
    "mixed" is SmolLM2-135M's Q4_1 file: Q8_0 embeddings, Q4_1 matrices; "multi" mixes
    types inside the fused projections (as Q4_K_M files do: v and down in another type)."""
    if ndim == 1:
        return "F32"
    if tensor_type == "multi":
        if hf_name.endswith(("v_proj.weight", "down_proj.weight")):
            return "Q8_0"
        return "F16" if hf_name.endswith(("q_proj.weight", "embed_tokens.weight")) else "Q4_0"
    if tensor_type == "mixed":
        return "Q8_0" if hf_name == "model.embed_tokens.weight" else "Q4_1"
    return tensor_type


def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """weight as it reads back after quantizing to qtype (rows quantized along the last dim)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    t = GGMLQuantizationType[qtype]
    data = quants.quantize(weight.detach().float().numpy(), t)
    return torch.from_numpy(np.array(quants.dequantize(data, t), dtype=np.float32)).reshape(weight.shape)


def _permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # convert_hf_to_gguf.LlamaModel.permute: rotate-half rows -> interleaved pairs.
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama3_rope_factors(rope: dict, theta: float, head_dim: int) -> list:
    # convert_hf_to_gguf.LlamaModel.generate_extra_tensors (the rope_freqs tensor).
    import math
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return factors


def write_gguf(hf_path, out_file, tensor_type: str = "F32", metadata: dict | None = None) -> Path:
    """Convert a checkpoint written by write_checkpoint to GGUF the way llama.cpp's
    converter does (Q/K row permutation for llama arch, rope_freqs for llama3 rope).
    tensor_type: F32, F16, Q8_0, Q4_0, Q4_1 for every matrix, or "mixed" (SmolLM2-like).
    metadata: {key: value} written over (or beside) the converter's keys, for tests of
    files whose metadata disagrees with their tensors (ints as INT32, floats as FLOAT32,
    or a (value, GGUFValueType) pair)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants
    from safetensors.torch import load_file
    hf_path, out_file = Path(hf_path), Path(out_file)
    cfg = json.loads((hf_path / "config.json").read_text())
    arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = GGUFWriter(str(out_file), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    from gguf import GGUFValueType
    for key, value in (metadata or {}).items():
        value, vtype = value if isinstance(value, tuple) else (value, GGUFValueType.get_type(value))
        w.add_key_value(key, value, vtype)

    tensors = {}
    for path in sorted(hf_path.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    for name, weight in tensors.items():
        if name in _GGUF_GLOBAL:
            gguf_name = _GGUF_GLOBAL[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_BLOCK[module]}.{kind}"
        if arch == "llama" and ".q_proj." in name:
            weight = _permute_qk(weight, heads)
        elif arch == "llama" and ".k_proj." in name:
            weight = _permute_qk(weight, kv_heads)
        qtype = GGMLQuantizationType[gguf_tensor_type(name, weight.ndim, tensor_type)]
        data = quants.quantize(weight.float().numpy(), qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight",
                     np.array(_llama3_rope_factors(rope, theta, head_dim), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


def run_all(engine) -> dict:
    """Step `engine` until it is idle; the final RequestOutput of each request by id."""
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    return outs
