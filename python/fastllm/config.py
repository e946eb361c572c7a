"""Configuration objects.

ModelConfig: what the model is (read from a Hugging Face directory's config.json +
generation_config.json, or built from GGUF metadata by `fastllm.model.gguf_loader`).
EngineConfig (scheduler / cache knobs) lives below it in this same file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from fastllm.utils import check_positive_int

# HF `architectures[0]` values the Llama-family model implements.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# model_type -> architecture, for config.json files that omit `architectures`.
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# Keys of generation_config.json that set sampling defaults (as vLLM's
# `generation_config="auto"` reads them); the engine applies them to SamplingParams.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                           "max_new_tokens")

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None = plain RoPE; else {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # bias on q/k/v projections (always on for Qwen2)
    o_proj_bias: bool = False         # Llama's attention_bias also biases o_proj; Qwen2's does not
    mlp_bias: bool = False
    # Informational (e.g. for a transformers config of the same shape). The ids that end
    # generation are the tokenizer's (Tokenizer.eos_token_ids), not read here.
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    # Mistral v0.1 attends over a 4096-token window; attention here is full, so the
    # engine must keep max_model_len <= sliding_window when it is set.
    sliding_window: Optional[int] = None
    dtype: Optional[str] = None       # the checkpoint's dtype ("bfloat16", ...), for dtype="auto"
    generation_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_scaling.rope_type {rope_type!r} is not supported; "
                                 f"supported: {', '.join(_ROPE_TYPES)}")
            needed = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}.get(rope_type, ())
            for key in needed:
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling.{key} is required for rope_type {rope_type!r}")
                value = self.rope_scaling[key]
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value <= 0):
                    raise ValueError(f"rope_scaling.{key} must be a positive number, got {value!r}")
            if rope_type == "llama3" and not (self.rope_scaling["high_freq_factor"]
                                              > self.rope_scaling["low_freq_factor"]):
                raise ValueError("rope_scaling.high_freq_factor must be greater than low_freq_factor")

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ------------------------------------------------------------------ HF directory
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read config.json (required) and generation_config.json (optional) in `path`."""
        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config.json not found in model directory {path!r}")
        hf = read_json(config_file)
        gen_file = os.path.join(path, "generation_config.json")
        gen = read_json(gen_file) if os.path.isfile(gen_file) else {}
        return cls.from_hf_dict(hf, gen, source=config_file)

    @classmethod
    def from_hf_dict(cls, hf: dict, generation: dict | None = None,
                     source: str = "config.json") -> "ModelConfig":
        generation = generation or {}
        architecture = _architecture(hf, source)

        def need(key):
            if key not in hf or hf[key] is None:
                raise ValueError(f"{source}: required field {key!r} is missing")
            return _positive_int(hf[key], key, source)

        def optional_int(key, default):
            value = hf.get(key)
            return default if value is None else _positive_int(value, key, source)

        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        hidden_size = need("hidden_size")
        num_heads = need("num_attention_heads")
        head_dim = optional_int("head_dim", hidden_size // num_heads)
        rope_theta, rope_scaling = _rope_from_hf(hf, source)

        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = True if is_qwen2 else bool(hf.get("attention_bias", False))
        sliding_window = optional_int("sliding_window", None)
        if is_qwen2 and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen2 carries a window size but disables it by default

        bos = generation.get("bos_token_id", hf.get("bos_token_id"))
        dtype = hf.get("dtype", hf.get("torch_dtype"))
        fields = dict(
            architecture=architecture,
            vocab_size=need("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=optional_int("num_key_value_heads", num_heads),
            head_dim=head_dim,
            rms_norm_eps=_finite(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=optional_int("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=bos,
            pad_token_id=hf.get("pad_token_id"),
            sliding_window=sliding_window,
            dtype=str(dtype) if dtype is not None else None,
            generation_defaults=_generation_defaults(generation, source),
        )
        try:
            return cls(**fields)
        except ValueError as e:      # ModelConfig.validate: name the file too
            raise ValueError(f"{source}: {e}") from None


def _architecture(hf: dict, source: str) -> str:
    """architectures[0], else the one model_type names; it must be supported."""
    archs = hf.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{source}: 'architectures' must be a list of strings, got {archs!r}")
    if archs:
        architecture = archs[0]
    elif hf.get("model_type") in _MODEL_TYPE_TO_ARCH:
        architecture = _MODEL_TYPE_TO_ARCH[hf["model_type"]]
    else:
        raise ValueError(f"{source}: neither 'architectures' nor a known 'model_type' "
                         f"(got model_type={hf.get('model_type')!r})")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architecture


def _generation_defaults(generation: dict, source: str) -> dict:
    """The sampling defaults of generation_config.json, type-checked here so a bad one
    names that file (not a SamplingParams built much later)."""
    where = os.path.join(os.path.dirname(source), "generation_config.json")
    out = {}
    for key in GENERATION_DEFAULT_KEYS:
        value = generation.get(key)
        if value is None:
            continue
        integral = key in ("top_k", "max_new_tokens")
        ok = (not isinstance(value, bool) and isinstance(value, int if integral else (int, float))
              and math.isfinite(value))
        if not ok:
            raise ValueError(f"{where}: {key} must be {'an integer' if integral else 'a finite number'}, "
                             f"got {value!r}")
        out[key] = value
    return out


def _positive_int(value, key: str, source: str) -> int:
    # Checked before any arithmetic on it: a 0 or a string would otherwise surface as a
    # bare ZeroDivisionError / TypeError.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _finite(value, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{source}: {key} must be a finite number, got {value!r}")
    return float(value)


def read_json(path) -> dict:
    """A JSON object from a file; ValueError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _rope_from_hf(hf: dict, source: str = "config.json") -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from either transformers 5's `rope_parameters`
    (theta inside the dict) or the older top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = _finite(params["rope_theta"], "rope_parameters.rope_theta", source)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _finite(hf.get("rope_theta", 10000.0), "rope_theta", source)
        scaling = hf.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"{source}: rope_scaling must be an object, got {scaling!r}")
        scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


# ---------------------------------------------------------------------------------------
# EngineConfig (owned by the engine; see fastllm.engine)

# The most of the machine's RAM swap_space may take (vLLM refuses more than 70%).
MAX_SWAP_FRACTION = 0.7


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class EngineConfig:
    """Scheduler and KV-cache knobs, named as vLLM names them (DESIGN §1)."""
    block_size: int = 16                   # tokens per KV block
    num_kv_blocks: Optional[int] = None    # None = sized from gpu_memory_utilization (GPU) / RAM (CPU)
    gpu_memory_utilization: float = 0.9    # fraction of GPU memory weights + activations + KV may use
    max_model_len: Optional[int] = None    # None = the model's max_position_embeddings
    max_num_seqs: int = 256                # cap on sequences running in one step
    max_num_batched_tokens: int = 8192     # token budget of one step (prefill chunks + decodes)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    swap_space: float = 0                  # GiB of CPU memory for preempted KV; 0 = recompute
    enforce_eager: bool = False            # True: never capture CUDA graphs (decode steps run eagerly)
    seed: int = 0
    # Decode CUDA graphs use block tables of ceil(min(max_model_len, this) / block_size)
    # columns; a step with a longer sequence runs eagerly (vLLM's name and default).
    max_seq_len_to_capture: int = 8192
    # Most logprobs a request may ask for per token (vLLM's name and default).
    max_logprobs: int = 20
    # fastllm.spec_decode.SpeculativeConfig, or the dict / JSON text of one; None = off.
    speculative_config: Optional[Any] = None

    def __post_init__(self):
        def positive_int(name):
            check_positive_int(f"EngineConfig.{name}", getattr(self, name))

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_seq_len_to_capture"):
            positive_int(name)
        for name in ("num_kv_blocks", "max_model_len"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not (isinstance(self.gpu_memory_utilization, (int, float))
                and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization!r}")
        self._check_swap_space()
        from fastllm.spec_decode.config import SpeculativeConfig
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                or not -(1 << 63) <= self.seed < (1 << 64)):
            raise ValueError(f"EngineConfig.seed must be a 64-bit integer, got {self.seed!r}")
        if (not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool)
                or self.max_logprobs < 0):
            raise ValueError(f"EngineConfig.max_logprobs must be an integer >= 0, "
                             f"got {self.max_logprobs!r}")

    def _check_swap_space(self) -> None:
        """GiB, finite, and at most MAX_SWAP_FRACTION of this machine's RAM (vLLM's
        limit): the swap space is allocated (and page-locked on a GPU) at start-up."""
        value = self.swap_space
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            raise ValueError(f"EngineConfig.swap_space must be a finite number of GiB >= 0, "
                             f"got {value!r}")
        total_gib = total_ram_bytes() / (1 << 30)
        if value > MAX_SWAP_FRACTION * total_gib:
            raise ValueError(f"EngineConfig.swap_space={value} GiB is more than "
                             f"{MAX_SWAP_FRACTION:.0%} of this machine's {total_gib:.1f} GiB of RAM")

    def resolve_max_model_len(self, model_config: "ModelConfig") -> int:
        """Fill max_model_len from the model (capped by a sliding window, which the
        full-attention kernels do not implement) and check it against the model."""
        limit = model_config.max_position_embeddings
        if model_config.sliding_window:
            limit = min(limit, model_config.sliding_window)
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds what the model supports "
                             f"({limit} tokens)")
        return self.max_model_len


@dataclass
class ParallelConfig:
    """How one engine spreads over processes (fastllm.distributed): world = tp * pp ranks
    per replica, data_parallel_size replicas. Rank 0 of a replica is the driver (schedules,
    samples); the others only compute."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            check_positive_int(name, getattr(self, name))

    @property
    def world_size(self) -> int:
        """Ranks of one replica (tensor x pipeline)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size
