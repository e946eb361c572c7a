"""Building blocks of the Llama-family decoder on the paged KV cache.

Every tensor on the hot path is the flattened super-sequence of seeds/001: T tokens of
S sequences (prefill chunks and decodes mixed) laid end to end, so no layer loops over
tokens, heads or sequences in Python.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from fastllm import ops
from fastllm.config import ModelConfig
from fastllm.distributed.sharding import head_split
from fastllm.distributed.tp_layers import make_row_linear
from fastllm.profiling import nvtx_range


class AttentionSpec(NamedTuple):
    """What every attention layer of a model shares: with a step's sizes, all a plan of
    its paged attention depends on (LlamaForCausalLM.attention_spec builds it; a tuple,
    as it is built every step)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, config: ModelConfig, k_cache: torch.Tensor) -> "AttentionSpec":
        """For layers of this config over caches like k_cache [num_blocks, block_size, Hkv, D]."""
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        return cls(config.num_attention_heads, num_kv_heads, head_dim, block_size, k_cache.dtype, k_cache.device)


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache (built by the engine), and how
    its attention runs. Given the layers' spec, the plan (which CUDA kernels, how long
    contexts split, the workspace) is made here, once for the step; the model plans
    metadata built without one (see planned_for) before its first layer."""
    slot_mapping: torch.Tensor     # [T] int64, slot = block_id*block_size + offset, -1 = don't write
    block_tables: torch.Tensor     # [S, max_blocks_per_seq] int32
    seq_lens: torch.Tensor         # [S] int32: tokens in cache after this step (computed + this step's)
    query_start_loc: torch.Tensor  # [S+1] int32 cumulative query counts
    max_query_len: Optional[int] = None  # longest q_len, known on the host (None: unknown)
    spec: Optional[AttentionSpec] = None
    plan: Optional[ops.AttentionPlan] = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.spec is not None:
            spec = self.spec
            self.plan = ops.plan_attention(
                num_tokens=self.slot_mapping.shape[0], num_seqs=self.block_tables.shape[0],
                max_blocks_per_seq=self.block_tables.shape[1], max_query_len=self.max_query_len,
                num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                block_size=spec.block_size, dtype=spec.dtype, device=spec.device)

    def planned_for(self, spec: AttentionSpec) -> "AttentionMetadata":
        """This metadata planned for layers of `spec`: itself when planned so already, else
        a planned copy (the caller's object is left as it is, so a CUDA-graph capture
        plans afresh in each forward it records, from its static buffers' shapes)."""
        if self.spec is None:
            return dataclasses.replace(self, spec=spec)
        if self.spec != spec:
            raise ValueError(f"AttentionMetadata was planned for {self.spec}, but the model's layers are {spec}")
        return self


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype = torch.float32, device="cpu") -> list:
    """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, num_kv_heads,
    head_dim]. Zero-filled so a kernel that reads a whole block never sees NaN garbage."""
    if num_blocks <= 0 or block_size <= 0:
        raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)]


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm (normalise in float32, scale in the model dtype), one kernel on
    CUDA; with a residual, vLLM's fused residual add + norm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [T, hidden] -> normed [T, hidden]. With residual [T, hidden]: both updated in
        place (residual += x, x = norm(residual)) and returned as (x, residual)."""
        if residual is None:
            out = torch.empty_like(x)
            ops.rms_norm(out, x, self.weight, self.eps)
            return out
        ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, with the checkpoint's rope scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling, rope_type = config.rope_scaling or {}, config.rope_type
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: stretch low frequencies (long wavelengths) by `factor`, keep high
        # ones, interpolate smoothly in between (transformers' _compute_llama3_parameters).
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE, as HF Llama/Mistral/Qwen2 apply it. cos/sin are
    computed for the step's positions (T x head_dim/2 values, a few small kernels), not
    cached for every position up to max_position_embeddings: a model file's claimed
    context length then allocates nothing (2^31 positions would be hundreds of GB)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.set_inv_freq(rope_inv_freq(config))

    def set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        """(Re)set the frequencies on inv_freq's device. The loader calls it after
        materialising a meta-device model, and with GGUF's rope_freqs applied."""
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, head_dim/2] in the model dtype for this step, computed once and
        shared by all layers (ops.rotary_embedding takes them as they are). Same float32
        products as HF's position * inv_freq (exact positions up to 2^24). No bounds
        check (it would sync the GPU): the engine keeps max_model_len <=
        max_position_embeddings."""
        freqs = positions.to(torch.float32).unsqueeze(1) * self.inv_freq.unsqueeze(0)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


class Attention(nn.Module):
    """GQA self-attention over the paged cache. q/k/v are one fused projection."""

    def __init__(self, config: ModelConfig, tp=None):
        """tp: the TP Communicator (None: one rank). Each rank holds its q heads and the
        KV heads they read (fastllm.distributed.sharding.head_split); o_proj sums the
        ranks' partial outputs."""
        super().__init__()
        self.heads = head_split(config, tp.world_size if tp else 1, tp.rank if tp else 0)
        self.num_heads = self.heads.num_heads
        self.num_kv_heads = self.heads.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        # rows: [q (H*D) | k (Hkv*D) | v (Hkv*D)]
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = make_row_linear(self.q_size, config.hidden_size, config.o_proj_bias, tp)

    def forward(self, cos_sin, hidden, kv_cache, meta: AttentionMetadata):
        """cos_sin from RotaryEmbedding.cos_sin; hidden [T, hidden_size]."""
        num_tokens = hidden.shape[0]
        # q, k, v: views of the one [T, q | k | v] projection (token stride q + 2 kv),
        # rotated and cached from there without copies.
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        ops.rotary_embedding(q, k, *cos_sin)
        k_cache, v_cache = kv_cache
        with nvtx_range("attention"):
            ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
            # q stays a view of the qkv output: paged_attention reads any token stride.
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            ops.paged_attention(out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                meta.query_start_loc, self.scale, meta.max_query_len, plan=meta.plan)
        return self.o_proj(out.view(num_tokens, self.q_size))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up as one fused projection."""

    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        # This TP rank's share of the intermediate size (column / row parallel).
        self.intermediate_size = config.intermediate_size // (tp.world_size if tp else 1)
        # rows: [gate (I) | up (I)]
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size,
                                      bias=config.mlp_bias)
        self.down_proj = make_row_linear(self.intermediate_size, config.hidden_size,
                                         config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                                   # [T, 2I]
        act = gate_up.new_empty(gate_up.shape[0], self.intermediate_size)  # [T, I]
        ops.silu_and_mul(act, gate_up)
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config, tp)

    def forward(self, cos_sin, hidden, residual, kv_cache, meta: AttentionMetadata):
        """hidden [T, hidden_size]: the previous layer's MLP output (the embeddings for the
        first layer, whose residual is None); residual: the stream before that output was
        added. Returns (this layer's MLP output, residual stream): the residual adds ride
        in the fused add + norm kernels, each updating its inputs in place."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual
