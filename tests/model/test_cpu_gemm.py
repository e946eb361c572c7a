"""cpu_gemm (model/cpu_gemm.py): the CPU model's fp32 GEMMs on oneDNN against float64,
with F.linear wherever oneDNN does not apply (other dtypes, views, autograd)."""
import pytest
import torch
import torch.nn.functional as F

from fastllm.model import cpu_gemm as gemm_module
from fastllm.model.cpu_gemm import cpu_gemm


def _want(x, w, b):
    return x.double() @ w.double().T + (0 if b is None else b.double())


@pytest.mark.parametrize("tokens,in_features,out_features", [(5, 576, 960), (512, 576, 3072), (129, 37, 19),
                                                            (1, 1536, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_gemm_matches_float64(tokens, in_features, out_features, bias):
    g = torch.Generator().manual_seed(tokens + in_features)
    x = torch.randn(tokens, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    got = cpu_gemm(x, w, b)
    want = _want(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (tokens, out_features)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_oracle_is_available_here():
    # On this torch (CPU wheel, x86) the oneDNN op exists, so the test above ran on it.
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    assert gemm_module._onednn_linear() is not None


@pytest.mark.parametrize("case", ["bf16", "strided", "batched", "autograd"])
def test_other_inputs_take_f_linear(case):
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(64, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    if case == "bf16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "strided":
        x = torch.randn(64, 100, generator=g)[:, :48]
    elif case == "batched":
        x = x.view(4, 16, 48)
    else:
        w.requires_grad_(True)
    got = cpu_gemm(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=0)
    if case == "autograd":
        got.sum().backward()
        assert w.grad is not None and w.grad.shape == w.shape
