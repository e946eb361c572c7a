"""QuantLinear: a linear layer whose weight stays in GGUF's blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
Q5_K, Q6_K, or F32/F16/BF16 rows), multiplied by fastllm.ops.quant_linear's kernels.

A fused projection (q|k|v, gate|up) whose parts were stored in different types (a
Q4_K_M file keeps some v and down weights in Q6_K) is a list of segments, each a run of
output rows in one type, written into its columns of one output.

Prefill on the CPU (a call of DEQUANT_GEMM_MIN_TOKENS tokens or more) dequantizes the
weight into a reused float32 scratch and runs torch's GEMM on it (fastllm.model.cpu_gemm):
decoding a layer's blocks costs a fraction of a millisecond, and the fp32 GEMM beats the
kernels' dequantize-as-you-go GEMM once enough tokens share each weight row. It takes x
in fp32, where the kernels below that size round each row of x to int8 blocks first (on
by default, as llama.cpp does: ops.set_cpu_int8_activations).
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from fastllm import ops
from fastllm.model.cpu_gemm import cpu_gemm

# From this many tokens a CPU call dequantizes and runs torch's GEMM (measured on the
# SmolLM2 Q4_1 layers, Zen 4, oneDNN's GEMM: the fp32-x kernels win at 16 tokens, lose by
# 5-10% at 32, 10-20% at 64, 15-25% at 128 and more; the int8-x kernels, on a Zen 3, win
# to 64-128 tokens by type and lose 2x at 512; 64 leaves a margin for other CPUs).
DEQUANT_GEMM_MIN_TOKENS = 64

# One float32 scratch per thread, grown to the largest weight seen and shared by every
# layer (a layer's dequantized weight is dead once its GEMM returns).
_scratch = threading.local()


def _dequant_scratch(numel: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


class QuantLinear(nn.Module):
    # No float weight: LlamaForCausalLM.checkpoint_weights skips a None weight, so only
    # the bias (if any) is loaded by name.
    weight = None

    def __init__(self, in_features: int, segments: list, bias: bool = False, device=None):
        """segments: [(ggml_type, uint8 [rows, row_bytes])], in output-row order."""
        super().__init__()
        if not segments:
            raise ValueError("QuantLinear needs at least one weight segment")
        self.in_features = in_features
        self.ggml_types = []
        self.row_starts = [0]
        for i, (ggml_type, blocks) in enumerate(segments):
            block_elems, block_bytes = ops.quant_block_shape(ggml_type)
            if in_features % block_elems or blocks.dim() != 2 or blocks.dtype != torch.uint8 \
                    or blocks.shape[1] != in_features // block_elems * block_bytes:
                raise ValueError(f"weight segment {i}: {tuple(blocks.shape)} {blocks.dtype} is not "
                                 f"rows of {in_features} weights in ggml type {ggml_type}")
            self.register_buffer(f"qweight{i}", blocks.to(device).contiguous())
            self.ggml_types.append(int(ggml_type))
            self.row_starts.append(self.row_starts[-1] + blocks.shape[0])
        self.out_features = self.row_starts[-1]
        # float32 always: the kernels add it in their fp32 accumulators.
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None

    def segments(self):
        return [(t, getattr(self, f"qweight{i}")) for i, t in enumerate(self.ggml_types)]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_single", None)   # .to() / .cuda() replace the buffers
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x's dtype (fp32 math)."""
        if x.dim() == 2 and x.dtype == torch.float32 and len(self.ggml_types) == 1 \
                and x.shape[0] < DEQUANT_GEMM_MIN_TOKENS:
            # The decode step's common case, without the module attribute lookups (a few
            # microseconds a call, 120 calls a step): (type, blocks) cached on first use.
            single = self.__dict__.get("_single")
            if single is None:
                single = self.__dict__["_single"] = (self.ggml_types[0], self.qweight0)
            return ops.quant_linear(x, single[1], single[0], self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        segments = self.segments()
        if x2.is_cpu and x2.shape[0] >= DEQUANT_GEMM_MIN_TOKENS and ops.native_available():
            y = cpu_gemm(x2, self.dequantize_into_scratch(), self.bias)
        elif len(segments) == 1:
            y = ops.quant_linear(x2, segments[0][1], segments[0][0], self.bias)
        else:
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            for (t, w), r0, r1 in zip(segments, self.row_starts, self.row_starts[1:]):
                bias = None if self.bias is None else self.bias[r0:r1]
                ops.quant_linear(x2, w, t, bias, out=y[:, r0:r1])
        y = y.reshape(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def dequantize_into_scratch(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features], each segment decoded into its
        rows of this thread's scratch (valid until the next layer's call)."""
        w = _dequant_scratch(self.out_features * self.in_features).view(self.out_features, self.in_features)
        for (t, blocks), r0, r1 in zip(self.segments(), self.row_starts, self.row_starts[1:]):
            ops.quant_dequantize(blocks, t, self.in_features, out=w[r0:r1])
        return w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_types={self.ggml_types}"
