"""Llama-family causal LM on the paged KV cache (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2).

The three architectures differ only in config (GQA ratio, rope scaling, qkv bias, tied
embeddings), so one module serves them all.
"""
from __future__ import annotations

import torch
from torch import nn

from fastllm.config import ModelConfig
from fastllm.model.layers import (AttentionMetadata, AttentionSpec, DecoderLayer, RMSNorm,
                                  RotaryEmbedding, allocate_kv_caches)

__all__ = ["LlamaForCausalLM", "AttentionMetadata", "allocate_kv_caches"]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' weight (tied checkpoints store only the latter)."""
        self.lm_head.weight = self.embed_tokens.weight
        self.config.tie_word_embeddings = True

    def attention_spec(self, kv_caches: list) -> AttentionSpec:
        """The shape every layer's attention shares over these caches (what a step's
        AttentionMetadata is planned for)."""
        return AttentionSpec.of(self.config, kv_caches[0][0])

    # Inference only: the fused ops write in place (through DLPack on CUDA, out= on CPU),
    # which autograd can neither see nor allow.
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] int64 (the flattened step); kv_caches: one
        (k_cache, v_cache) per layer. Returns [S, vocab] float32 logits of each
        sequence's last query token (rows query_start_loc[1:] - 1), or [R, vocab] of the
        rows meta.logits_indices names."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model has "
                             f"{len(self.layers)} layers")
        if meta.plan is None and kv_caches:   # the step's attention plan, once for every layer
            meta = meta.planned_for(self.attention_spec(kv_caches))
        hidden = self.embed_tokens(input_ids)                        # [T, hidden]
        cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(cos_sin, hidden, residual, kv_cache, meta)
        # Only the rows that get sampled go through the last residual add, the final
        # norm and the LM head (the gathers are copies, so the add stays out of place).
        last = meta.logits_indices
        if last is None:
            last = meta.query_start_loc[1:].long() - 1               # [S]
        hidden, _ = self.norm(hidden[last], residual[last])
        return self.lm_head(hidden).float()                          # [S, vocab]

    def checkpoint_weights(self) -> dict:
        """HF checkpoint tensor name -> (parameter, row slice of it or None).

        q/k/v and gate/up are stored separately in checkpoints but fused here, so
        each lands in its rows of the fused parameter. lm_head.weight is absent when
        the embeddings are tied."""
        weights = {"model.embed_tokens.weight": (self.embed_tokens.weight, None),
                   "model.norm.weight": (self.norm.weight, None)}
        if not self.config.tie_word_embeddings:
            weights["lm_head.weight"] = (self.lm_head.weight, None)
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate_size
            fused = (
                ("self_attn", attn.qkv_proj, (("q_proj", 0, q), ("k_proj", q, q + kv),
                                              ("v_proj", q + kv, q + 2 * kv))),
                ("mlp", mlp.gate_up_proj, (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter))),
            )
            for module_name, linear, parts in fused:
                for part, start, end in parts:
                    for kind in ("weight", "bias"):
                        param = getattr(linear, kind)
                        if param is not None:
                            weights[f"{prefix}{module_name}.{part}.{kind}"] = (param, slice(start, end))
            for name, linear in (("self_attn.o_proj", attn.o_proj), ("mlp.down_proj", mlp.down_proj)):
                for kind in ("weight", "bias"):
                    param = getattr(linear, kind)
                    if param is not None:
                        weights[f"{prefix}{name}.{kind}"] = (param, None)
            weights[prefix + "input_layernorm.weight"] = (layer.input_layernorm.weight, None)
            weights[prefix + "post_attention_layernorm.weight"] = (
                layer.post_attention_layernorm.weight, None)
        return weights
