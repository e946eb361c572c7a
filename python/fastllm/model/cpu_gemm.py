"""fp32 GEMMs of the CPU model (prefill, batched decode) on torch's oneDNN matmul.

torch.nn.functional.linear runs fp32 on MKL's sgemm. torch also ships oneDNN, whose
kernels use the CPU's widest vectors (AVX-512 where present; MKL keeps to AVX2 on
AMD processors): on the 2-core AMD EPYC bench machine, SmolLM2's four projections at 512
tokens took 36.7 ms a layer on oneDNN against 47.1 ms on MKL (one thread, CPU time), and
oneDNN was ahead from 5 tokens up. torch.ops.mkldnn._linear_pointwise (the op torch's own
compiler emits for a CPU linear) takes the dense [N, K] weight as it is, so nothing is
repacked or copied. Same fp32 products, summed in another order (max relative error
~1e-6 against float64, as MKL's).

Where the op is missing or refuses its input, or autograd would need it, F.linear runs.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

_op = None            # the oneDNN linear, found on first use
_disabled = False     # it failed once: F.linear from then on


def _onednn_linear():
    global _op, _disabled
    if _op is None and not _disabled:
        try:
            if not torch.backends.mkldnn.is_available():
                raise RuntimeError("torch was built without oneDNN")
            _op = torch.ops.mkldnn._linear_pointwise
        except (AttributeError, RuntimeError):
            _disabled = True
    return None if _disabled else _op


def cpu_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ weight[N, K]^T (+ bias [N]) -> [T, N]: oneDNN for contiguous fp32 CPU
    tensors outside autograd, else F.linear (any shape and dtype it takes)."""
    global _disabled
    op = _onednn_linear()
    if (op is not None and x.dim() == 2 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.is_cpu and weight.is_cpu and x.is_contiguous() and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        try:
            return op(x, weight, bias, "none", [], "")
        except RuntimeError as e:  # e.g. a torch whose op signature changed
            _disabled = True
            logging.getLogger(__name__).warning("oneDNN linear failed (%s); using F.linear", e)
    return F.linear(x, weight, bias)
