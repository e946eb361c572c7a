"""CpuDenseLinear: nn.Linear whose few-token calls on the CPU (the decode step) run
fastllm's GEMV instead of torch's.

torch's fp32 GEMV (MKL on this AMD CPU) reads about 11 GB/s and gains nothing from a
second thread; the quantized kernels' F32 / BF16 row path (fastllm.ops.quant_linear,
ggml types 0 and 30 over the weight's bytes) splits rows over fastllm's pool and streams
near copy bandwidth. bf16 weights are widened to fp32 in registers: half the bytes of
fp32, fp32 math (this Zen 2 CPU has no bf16 dot instructions). Calls with more tokens
(prefill) stay on torch's GEMM, which wins there (fastllm.model.cpu_gemm: oneDNN's, for fp32).
"""
from __future__ import annotations

import torch
from torch import nn

from fastllm import ops
from fastllm.model.cpu_gemm import cpu_gemm

# ggml type of each weight dtype the row path reads.
GGML_TYPE = {torch.float32: 0, torch.bfloat16: 30, torch.float16: 1}
# Up to this many tokens a call runs the GEMV (a batch-1 decode step has one; a few
# decoding sequences still read the weight once per token-group).
MAX_GEMV_TOKENS = 4


class CpuDenseLinear(nn.Linear):
    """Shares the weight and bias Parameters of the nn.Linear it replaces (a tied
    lm_head keeps pointing at the embeddings)."""

    @classmethod
    def replacing(cls, linear: nn.Linear) -> "CpuDenseLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dim() != 2 or x.shape[0] > MAX_GEMV_TOKENS or not w.is_contiguous() or w.dtype not in GGML_TYPE:
            return cpu_gemm(x, w, self.bias)   # oneDNN for fp32, else F.linear
        bias = None if self.bias is None else self.bias.float()
        x32 = x if x.dtype == torch.float32 else x.float()
        y = ops.quant_linear(x32, w.view(torch.uint8), GGML_TYPE[w.dtype], bias)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def install_cpu_dense_linears(model: nn.Module) -> int:
    """Swap every plain nn.Linear of a CPU model for a CpuDenseLinear over the same
    Parameters; returns how many. Other devices, or no fastllm._C: nothing changes."""
    if not ops.native_available():
        return 0
    swaps = [(owner, name, child) for owner in model.modules() for name, child in owner.named_children()
             if type(child) is nn.Linear and child.weight.device.type == "cpu"]
    for owner, name, child in swaps:
        setattr(owner, name, CpuDenseLinear.replacing(child))
    return len(swaps)
