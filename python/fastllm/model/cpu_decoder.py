"""The decoder layers of a CPU model as one C++ call per step (fastllm.ops.CpuDecoder).

A batch-1 decode step of a 30-layer model is ~300 Python -> C++ op calls, plus tensor
allocations and module dispatch between them, which cost about as much as the GEMVs
themselves. The C++ decoder runs the same kernels in the same order (so the step's numbers
are the module path's) with nothing in between; the embedding, RoPE's cos/sin, the final
norm and the LM head stay in Python (a few calls).

Eligible: a CPU model of one rank (no TP/PP) with fp32 activations, fastllm._C built,
every projection a QuantLinear or a CpuDenseLinear over F32/F16/BF16 weights.
Quantized weights run here below quant_linear.DEQUANT_GEMM_MIN_TOKENS tokens (the module
path calls the same kernels there; from that size on it dequantizes for the fp32 GEMM,
which wins); dense weights only up to cpu_linear.MAX_GEMV_TOKENS tokens, beyond which
torch's GEMM is what the module path uses (and wins). FASTLLM_CPU_DECODER=0 turns it off.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from fastllm import envs, ops
from fastllm.model.cpu_linear import GGML_TYPE, MAX_GEMV_TOKENS, CpuDenseLinear
from fastllm.model.quant_linear import DEQUANT_GEMM_MIN_TOKENS
from fastllm.model.quant_linear import QuantLinear

logger = logging.getLogger(__name__)


class ModelCpuDecoder:
    """The layers of one LlamaForCausalLM as an ops.CpuDecoder, and when a step may use it."""

    def __init__(self, decoder: ops.CpuDecoder, max_tokens: Optional[int]):
        self.decoder = decoder
        self.max_tokens = max_tokens   # None: any step size

    def runs(self, hidden: torch.Tensor) -> bool:
        """Whether this step (hidden [T, hidden_size]) goes through the C++ decoder."""
        return (hidden.dtype == torch.float32 and hidden.device.type == "cpu"
                and (self.max_tokens is None or hidden.shape[0] <= self.max_tokens))

    def __call__(self, cos_sin, hidden, residual, kv_caches: list, meta):
        """DecoderLayer.forward of every layer: -> (last MLP output, residual stream), both
        [T, hidden_size]; hidden (and residual, when given) are updated in place."""
        has_residual = residual is not None
        if not has_residual:
            residual = torch.empty_like(hidden)
        self.decoder.forward(hidden, residual, has_residual, *cos_sin, kv_caches, meta.slot_mapping,
                             meta.block_tables, meta.seq_lens, meta.query_start_loc)
        return hidden, residual


def build_cpu_decoder(model) -> Optional[ModelCpuDecoder]:
    """The C++ decoder of `model` (a loaded LlamaForCausalLM), or None when it is not
    eligible (see the module doc) or FASTLLM_CPU_DECODER=0."""
    if envs.FASTLLM_CPU_DECODER == "0" or not ops.cpu_decoder_available():
        return None
    if model.parallel.world_size != 1 or model.embed_tokens is None or not len(model.layers):
        return None
    if model.embed_tokens.weight.dtype != torch.float32 or model.embed_tokens.weight.device.type != "cpu":
        return None
    layers, dense = [], False
    if len({_layer_shape(layer) for layer in model.layers}) != 1:
        return None   # the C++ decoder's layers share one shape
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_linear_spec(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        if None in linears or any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
            return None
        dense = dense or any(isinstance(m, CpuDenseLinear)
                             for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj))
        layers.append((*(n.detach() for n in norms), *linears))
    first = model.layers[0]
    decoder = ops.CpuDecoder(
        hidden_size=model.config.hidden_size, num_heads=first.self_attn.num_heads,
        num_kv_heads=first.self_attn.num_kv_heads, head_dim=first.self_attn.head_dim,
        intermediate_size=first.mlp.intermediate_size, eps=first.input_layernorm.eps,
        scale=first.self_attn.scale, layers=layers)
    return ModelCpuDecoder(decoder, MAX_GEMV_TOKENS if dense else DEQUANT_GEMM_MIN_TOKENS - 1)


def _layer_shape(layer) -> tuple:
    attn = layer.self_attn
    return (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale, layer.mlp.intermediate_size,
            layer.input_layernorm.eps, layer.post_attention_layernorm.eps)


def _linear_spec(linear) -> Optional[tuple]:
    """(segments, fp32 bias or None) as ops.CpuDecoder takes them, or None when the layer
    is of a kind the decoder does not run."""
    if isinstance(linear, QuantLinear):
        if any(w.device.type != "cpu" for _, w in linear.segments()):
            return None
        return linear.segments(), None if linear.bias is None else linear.bias.detach()
    if isinstance(linear, CpuDenseLinear):
        w = linear.weight
        if w.device.type != "cpu" or w.dtype not in GGML_TYPE or not w.is_contiguous():
            return None
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        return [(GGML_TYPE[w.dtype], w.detach().view(torch.uint8))], bias
    return None


def install_cpu_decoder(model) -> bool:
    """Give `model` its C++ decoder (model.cpu_decoder) when eligible; whether it has one."""
    model.cpu_decoder = build_cpu_decoder(model)
    if model.cpu_decoder is not None:
        logger.debug("CPU decoder: %d layers in one C++ call per step%s", len(model.layers),
                    "" if model.cpu_decoder.max_tokens is None
                    else f" (steps of up to {model.cpu_decoder.max_tokens} tokens)")
    return model.cpu_decoder is not None
