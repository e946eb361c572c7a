"""The model a benchmark drives: a checkpoint (`--model`) or random weights of a known shape.

Random weights are built in memory directly on the device (no checkpoint on disk, no
tokenizer: benchmarks feed token ids), so an 8B-shaped model is ready in seconds on a GPU
and a tiny one runs the whole sweep on a CPU. Speed depends on shapes, not on values.

The model is loaded once and shared by every engine of a sweep (`make_engine`), so a
grid over gpu_memory_utilization re-sizes only the KV cache.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fastllm.config import EngineConfig, ModelConfig

# ModelConfig fields of each preset (Llama architecture).
RANDOM_PRESETS = {
    # CPU tests and CI: milliseconds per step.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=512),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=8192, rope_theta=500000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # Mistral-7B v0.1: Llama layers with GQA 4:1 and a 4096-token sliding window (the
    # engine caps max_model_len at the window, so attention is the same as full).
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       sliding_window=4096),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    name: str            # the checkpoint path or "random:<preset>"


def load(model: Optional[str] = None, random_weights: Optional[str] = None,
         device: str = "auto", dtype: str = "auto", seed: int = 0) -> LoadedModel:
    """Exactly one of `model` (HF directory or .gguf) and `random_weights` (a preset name)."""
    from fastllm.model.loader import load_for_engine, resolve_device, resolve_dtype
    if (model is None) == (random_weights is None):
        raise ValueError("give exactly one of --model PATH and --random-weights PRESET")
    if random_weights is not None:
        if random_weights not in RANDOM_PRESETS:
            raise ValueError(f"--random-weights {random_weights!r} is not a preset; "
                             f"choose from {', '.join(RANDOM_PRESETS)}")
        dev = resolve_device(device)
        config = ModelConfig(architecture="LlamaForCausalLM", **RANDOM_PRESETS[random_weights])
        torch_dtype = resolve_dtype(dtype, dev)
        return LoadedModel(random_model(config, torch_dtype, dev, seed), config, dev, torch_dtype,
                           f"random:{random_weights}")
    if not os.path.exists(model):
        raise ValueError(f"--model {model!r} does not exist")
    # Dequantized (quantization=None): the transformers baseline shares these float weights.
    # `bench cpu` measures GGUF weights kept quantized.
    net, config, dev, torch_dtype = load_for_engine(model, dtype=dtype, device=device, quantization=None)
    return LoadedModel(net, config, dev, torch_dtype, model)


@torch.no_grad()
def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """LlamaForCausalLM with N(0, 0.02) weights and unit norm weights, made on `device`."""
    from fastllm.model.loader import build_empty_model
    model = build_empty_model(config, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
    return model


def make_engine(loaded: LoadedModel, engine_config: EngineConfig):
    """An LLMEngine over the shared model (no tokenizer: prompts are token ids)."""
    from fastllm.engine.llm_engine import LLMEngine
    return LLMEngine(loaded.model, loaded.config, engine_config, tokenizer=None,
                     device=loaded.device, dtype=loaded.dtype)


def release(device: torch.device) -> None:
    """Return a dropped engine's KV cache to the device before the next one sizes its own."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
