"""QuantLinear's prefill path on the CPU (from DEQUANT_GEMM_MIN_TOKENS tokens: the blocks
dequantized into a shared float32 scratch, then torch's GEMM) against float64 math on the
`gguf` package's dequantization, for every block type, fused projections mixing types,
a bias, batched input shapes, and layers of different sizes sharing the scratch."""
import pytest
import torch

from fastllm import ops
from fastllm.model import quant_linear
from fastllm.model.quant_linear import QuantLinear
from tests.ops.quant_blocks import FLOAT_TYPES, QUANT_TYPES, gguf_dequantize, random_blocks

pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

ALL_TYPES = {**QUANT_TYPES, **FLOAT_TYPES}
PREFILL = quant_linear.DEQUANT_GEMM_MIN_TOKENS


def _oracle_weight(blocks: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """float64 [rows, in_features]: gguf's dequantization (float rows: their own values)."""
    if ggml_type in FLOAT_TYPES.values():
        dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[ggml_type]
        return blocks.contiguous().view(dtype).reshape(blocks.shape[0], in_features).double()
    return torch.from_numpy(gguf_dequantize(blocks, ggml_type)).reshape(blocks.shape[0], in_features)


def _layer(types, rows, in_features, bias, seed):
    segments = [(t, random_blocks(t, n, in_features, seed=seed + i)) for i, (t, n) in enumerate(zip(types, rows))]
    layer = QuantLinear(in_features, segments, bias=bias)
    if bias:
        layer.bias.copy_(torch.randn(layer.out_features, generator=torch.Generator().manual_seed(seed)))
    want_w = torch.cat([_oracle_weight(b, t, in_features) for t, b in segments])
    return layer, want_w


def _check(layer, want_w, x):
    want = x.double() @ want_w.T
    if layer.bias is not None:
        want += layer.bias.double()
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], layer.out_features)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name", list(ALL_TYPES))
@pytest.mark.parametrize("tokens", [PREFILL, PREFILL + 37])
def test_prefill_path_matches_gguf_dequantization(name, tokens):
    t = ALL_TYPES[name]
    in_features = 512 if t in QUANT_TYPES.values() else 96
    layer, want_w = _layer([t], [45], in_features, bias=False, seed=t)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens))
    _check(layer, want_w, x)


def test_prefill_path_fused_segments_bias_and_batched_input():
    # q|k|v as a Q4_K_M file stores them (Q4_K, Q4_K, Q6_K) plus an F16 tail, with a bias;
    # x [2, T, K]: the leading dims fold into the token count.
    layer, want_w = _layer([12, 12, 14, 1], [64, 16, 16, 8], 256, bias=True, seed=3)
    x = torch.randn(2, PREFILL // 2 + 5, 256, generator=torch.Generator().manual_seed(0))
    _check(layer, want_w, x)


def test_layers_of_different_sizes_share_the_scratch():
    # A big layer grows the scratch, a smaller one then reuses its start: each call must
    # still see only its own weight, in either order and repeatedly.
    big, big_w = _layer([3], [300], 256, bias=False, seed=11)
    small, small_w = _layer([8], [20], 512, bias=True, seed=12)
    g = torch.Generator().manual_seed(1)
    xb, xs = torch.randn(PREFILL, 256, generator=g), torch.randn(PREFILL + 1, 512, generator=g)
    for layer, w, x in [(small, small_w, xs), (big, big_w, xb), (small, small_w, xs), (big, big_w, xb)]:
        _check(layer, w, x)


def test_decode_and_prefill_paths_agree(fp32_activations):
    # The kernels' GEMM (below the threshold) and the dequantize + GEMM path compute the
    # same products: rows run on either path give the same values within fp32 rounding
    # (with fp32 x in both: the kernels' default int8 x is tests/ops/test_quant_linear's).
    layer, _ = _layer([3, 14], [40, 24], 256, bias=True, seed=21)
    x = torch.randn(PREFILL, 256, generator=torch.Generator().manual_seed(2))
    whole = layer(x)
    in_pieces = torch.cat([layer(x[i:i + 16]) for i in range(0, PREFILL, 16)])
    torch.testing.assert_close(whole, in_pieces, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
