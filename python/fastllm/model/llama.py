"""Llama-family causal LM on the paged KV cache (Llama 2/3/3.1, SmolLM2, Mistral, Qwen2).

The three architectures differ only in config (GQA ratio, rope scaling, qkv bias, tied
embeddings), so one module serves them all.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from fastllm.config import ModelConfig
from fastllm.distributed.parallel_state import ParallelContext
from fastllm.distributed.sharding import local_model_config, partition_layers
from fastllm.distributed.tp_layers import make_embedding, make_lm_head
from fastllm.model.layers import (AttentionMetadata, AttentionSpec, DecoderLayer, RMSNorm,
                                  RotaryEmbedding, allocate_kv_caches)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

__all__ = ["LlamaForCausalLM", "AttentionMetadata", "allocate_kv_caches"]


class LlamaForCausalLM(nn.Module):
    # The layers as one C++ call per CPU step (model/cpu_decoder.py: install_cpu_decoder
    # sets it after loading), or None: layer by layer.
    cpu_decoder = None

    def __init__(self, config: ModelConfig, parallel: Optional[ParallelContext] = None):
        """parallel: this rank's TP and PP groups (None: one rank). With pipeline stages
        the model holds its stage's layers only; the first stage embeds, the last runs the
        final norm and the LM head."""
        super().__init__()
        self.config = config
        self.parallel = parallel if parallel is not None else ParallelContext.single()
        tp, pp = self.parallel.tp, self.parallel.pp
        self.layer_start, self.layer_stop = partition_layers(config.num_hidden_layers,
                                                             pp.world_size)[pp.rank]
        # This rank's heads and layers: what its KV cache and attention plans are sized for.
        self.local_config = local_model_config(config, tp.world_size, tp.rank, pp.world_size, pp.rank)
        self.rotary = RotaryEmbedding(config)
        first, last = self.parallel.is_first_stage, self.parallel.is_last_stage
        self.embed_tokens = make_embedding(config.vocab_size, config.hidden_size, tp) if first else None
        self.layers = nn.ModuleList(DecoderLayer(config, tp)
                                    for _ in range(self.layer_start, self.layer_stop))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None
        self.lm_head = make_lm_head(config.vocab_size, config.hidden_size, tp) if last else None
        if config.tie_word_embeddings:
            self.tie_weights()

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() may replace the tensors the C++ decoder points at: build it anew.
        had_decoder, self.cpu_decoder = self.cpu_decoder is not None, None
        out = super()._apply(fn, *args, **kwargs)
        if had_decoder:
            from fastllm.model.cpu_decoder import install_cpu_decoder
            install_cpu_decoder(self)
        return out

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' weight (tied checkpoints store only the latter).
        A last stage without the embedding loads the embedding's tensor into its head."""
        if self.lm_head is not None and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight
        self.config.tie_word_embeddings = True

    def attention_spec(self, kv_caches: list) -> AttentionSpec:
        """The shape every layer's attention shares over these caches (what a step's
        AttentionMetadata is planned for): this rank's heads."""
        return AttentionSpec.of(self.local_config, kv_caches[0][0])

    # Inference only: the fused ops write in place (through DLPack on CUDA, out= on CPU),
    # which autograd can neither see nor allow.
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata, activations: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids, positions: [T] int64 (the flattened step); kv_caches: one
        (k_cache, v_cache) per layer of this stage; activations: [2, T, hidden] (hidden,
        residual) from the previous pipeline stage (None on the first, which embeds).
        Returns [S, vocab] float32 logits of each sequence's last query token (rows
        query_start_loc[1:] - 1), or [R, vocab] of the rows meta.logits_indices names, on
        the last stage, else this stage's [2, T, hidden] activations for the next (the
        runner moves them: fastllm.engine.pipeline)."""
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches has {len(kv_caches)} entries, the model has "
                             f"{len(self.layers)} layers")
        if meta.plan is None and kv_caches:   # the step's attention plan, once for every layer
            meta = meta.planned_for(self.attention_spec(kv_caches))
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None        # [T, hidden]
        elif activations is None:
            raise ValueError("a later pipeline stage needs the previous stage's activations")
        else:
            hidden, residual = activations                               # 2 x [T, hidden]
        cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        decoder = self.cpu_decoder
        if decoder is not None and decoder.runs(hidden):   # every layer in one C++ call
            hidden, residual = decoder(cos_sin, hidden, residual, kv_caches, meta)
        else:
            for layer, kv_cache in zip(self.layers, kv_caches):
                hidden, residual = layer(cos_sin, hidden, residual, kv_cache, meta)
        if self.norm is None:
            return torch.stack((hidden, residual))                       # [2, T, hidden]
        # Only the rows that get sampled go through the last residual add, the final
        # norm and the LM head (the gathers are copies, so the add stays out of place).
        last = meta.logits_indices
        if last is None:
            last = meta.query_start_loc[1:].long() - 1               # [S]
        hidden, _ = self.norm(hidden[last], residual[last])
        return self.lm_head(hidden).float()                          # [S, vocab]

    def checkpoint_weights(self) -> dict:
        """HF checkpoint tensor name -> (parameter, row slice of it or None), for the
        tensors this rank holds (its stage's; see checkpoint_shards for which part).

        q/k/v and gate/up are stored separately in checkpoints but fused here, so
        each lands in its rows of the fused parameter. lm_head.weight is absent when
        the embeddings are tied."""
        return {name: (param, rows) for name, (param, rows, _) in self._weight_map().items()}

    def checkpoint_shards(self) -> dict:
        """HF tensor name -> (dim, start, stop): the part of the checkpoint tensor this
        TP rank holds; names absent are read whole."""
        return {name: shard for name, (_, _, shard) in self._weight_map().items()
                if shard is not None}

    def holds_weight(self, name: str) -> bool:
        """False for a checkpoint tensor of another pipeline stage (skipped unread)."""
        match = _LAYER_RE.match(name)
        if match:
            return self.layer_start <= int(match.group(1)) < self.layer_stop
        if name == "model.embed_tokens.weight":
            return self.embed_tokens is not None or (
                self.lm_head is not None and self.config.tie_word_embeddings)
        if name == "lm_head.weight":
            return self.lm_head is not None
        if name == "model.norm.weight":
            return self.norm is not None
        return True                   # unknown names stay the loader's error

    def _weight_map(self) -> dict:
        """name -> (parameter, its rows or None, checkpoint shard or None)."""
        tp = self.parallel.tp
        weights = {}
        vocab = self._vocab_shard()
        if self.embed_tokens is not None:
            weights["model.embed_tokens.weight"] = (self.embed_tokens.weight, *vocab)
        if self.norm is not None:
            weights["model.norm.weight"] = (self.norm.weight, None, None)
            tied_name = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
            if tied_name not in weights:
                weights[tied_name] = (self.lm_head.weight, *vocab)
        for i, layer in zip(range(self.layer_start, self.layer_stop), self.layers):
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate_size
            d, heads = attn.head_dim, attn.heads
            sharded = tp.world_size > 1
            q_rows = (heads.q_start * d, heads.q_start * d + q) if sharded else None
            kv_rows = (heads.kv_start * d, heads.kv_start * d + kv) if sharded else None
            i_rows = (tp.rank * inter, (tp.rank + 1) * inter) if sharded else None
            fused = (
                ("self_attn", attn.qkv_proj, (("q_proj", 0, q, q_rows), ("k_proj", q, q + kv, kv_rows),
                                              ("v_proj", q + kv, q + 2 * kv, kv_rows))),
                ("mlp", mlp.gate_up_proj, (("gate_proj", 0, inter, i_rows),
                                           ("up_proj", inter, 2 * inter, i_rows))),
            )
            for module_name, linear, parts in fused:
                for part, start, end, src in parts:
                    for kind in ("weight", "bias"):
                        param = getattr(linear, kind)
                        if param is not None:
                            weights[f"{prefix}{module_name}.{part}.{kind}"] = (
                                param, slice(start, end), None if src is None else (0, *src))
            # Row-parallel: this rank's input columns of the weight; the bias whole.
            for name, linear, cols in (("self_attn.o_proj", attn.o_proj, q_rows),
                                       ("mlp.down_proj", mlp.down_proj, i_rows)):
                if linear.weight is not None:
                    weights[f"{prefix}{name}.weight"] = (linear.weight, None,
                                                         None if cols is None else (1, *cols))
                if linear.bias is not None:
                    weights[f"{prefix}{name}.bias"] = (linear.bias, None, None)
            weights[prefix + "input_layernorm.weight"] = (layer.input_layernorm.weight, None, None)
            weights[prefix + "post_attention_layernorm.weight"] = (
                layer.post_attention_layernorm.weight, None, None)
        return weights

    def _vocab_shard(self) -> tuple:
        """(rows of the local embedding / head that hold real ids, their checkpoint rows)."""
        module = self.embed_tokens if self.embed_tokens is not None else self.lm_head
        if self.parallel.tp.world_size == 1:
            return None, None
        start, n = module.start, module.num_real_rows
        return slice(0, n), (0, start, start + n)
