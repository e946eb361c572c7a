"""CpuDenseLinear (model/cpu_linear.py): the decode step's dense linears on fastllm's
GEMV, against float64; swapped in place of nn.Linear with the same Parameters."""
import pytest
import torch
from torch import nn

from fastllm import ops
from fastllm.model.cpu_linear import MAX_GEMV_TOKENS, CpuDenseLinear, install_cpu_dense_linears

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, MAX_GEMV_TOKENS + 3])
@pytest.mark.parametrize("in_features,bias", [(576, False), (37, True), (1536, True)])
def test_cpu_dense_linear_matches_float64(dtype, tokens, in_features, bias):
    torch.manual_seed(tokens)
    linear = nn.Linear(in_features, 301, bias=bias).to(dtype)
    x = torch.randn(tokens, in_features).to(dtype)
    fast = CpuDenseLinear.replacing(linear)
    with torch.no_grad():
        got = fast(x)
    want = x.double() @ linear.weight.double().T + (linear.bias.double() if bias else 0)
    assert got.dtype == dtype and got.shape == (tokens, 301)
    # fp32 math on the stored weights; the output rounds to the model dtype.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_install_keeps_parameters_and_ties():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.proj = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.embed.weight        # tied, as LlamaForCausalLM ties lm_head

    model = Tiny()
    proj_weight = model.proj.weight
    assert install_cpu_dense_linears(model) == 2
    assert type(model.proj) is CpuDenseLinear and type(model.head) is CpuDenseLinear
    assert model.proj.weight is proj_weight and model.head.weight is model.embed.weight
    x = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.head(x).double(), x.double() @ model.embed.weight.double().T,
                                   rtol=1e-5, atol=1e-5)
