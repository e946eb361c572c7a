"""quant_linear / quant_dequantize (GGUF blocks kept as stored): the C++ CPU kernels (AVX2
and portable builds) and the CUDA kernel against the float64 reference, which is itself
checked against the `gguf` package's dequantization."""
import numpy as np
import pytest
import torch

from fastllm import ops, reference
from tests.ops.quant_blocks import FLOAT_TYPES, QUANT_TYPES, gguf_dequantize, random_blocks

ALL_TYPES = {**QUANT_TYPES, **FLOAT_TYPES}
native = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C not built")


def _in_features(ggml_type: int, blocks: int) -> int:
    return reference.GGML_BLOCKS[ggml_type][0] * blocks if ggml_type in QUANT_TYPES.values() else 32 * blocks + 5


@pytest.mark.parametrize("name", list(QUANT_TYPES))
def test_reference_matches_gguf(name):
    t = QUANT_TYPES[name]
    K = _in_features(t, 3)
    w = random_blocks(t, 41, K, seed=t)
    ref = reference.quant_dequantize(w, t, K).numpy()
    oracle = gguf_dequantize(w, t)
    assert np.abs(oracle).max() > 0.1  # the random blocks hold real values
    np.testing.assert_allclose(ref, oracle, rtol=1e-6, atol=1e-6)


@native
@pytest.mark.parametrize("name", list(ALL_TYPES))
def test_native_dequantize_matches_gguf(name, isa):
    t = ALL_TYPES[name]
    K = _in_features(t, 3)
    w = random_blocks(t, 29, K, seed=7)
    got = ops.quant_dequantize(w, t, K).numpy()
    want = reference.quant_dequantize(w, t, K).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if t in QUANT_TYPES.values():
        np.testing.assert_allclose(got, gguf_dequantize(w, t), rtol=1e-6, atol=1e-6)


def _check_linear(name, tokens, out_features, blocks, device="cpu", bias=False, strided=False):
    t = ALL_TYPES[name]
    K = _in_features(t, blocks)
    w = random_blocks(t, out_features, K, seed=tokens + out_features)
    x = torch.randn(tokens, K + (7 if strided else 0))
    x = x[:, :K] if strided else x                      # row stride > K: a view
    b = torch.randn(out_features) if bias else None
    want = torch.empty(tokens, out_features, dtype=torch.float64)
    reference.quant_linear(want, x, w, t, b)
    dev = torch.device(device)
    got = ops.quant_linear(x.to(dev), w.to(dev), t, None if b is None else b.to(dev)).cpu()
    assert got.dtype == torch.float32 and got.shape == (tokens, out_features)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@native
@pytest.mark.parametrize("name", list(ALL_TYPES))
@pytest.mark.parametrize("tokens,out_features,blocks", [(1, 37, 3), (2, 5, 1), (5, 131, 2), (67, 19, 2)])
def test_quant_linear_cpu(name, tokens, out_features, blocks, isa):
    _check_linear(name, tokens, out_features, blocks)


@native
@pytest.mark.parametrize("name", ["Q4_1", "Q6_K"])
def test_quant_linear_bias_and_strided_input(name, isa):
    _check_linear(name, 3, 23, 2, bias=True, strided=True)


@native
@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("out_features", [1, 2, 301])
def test_quant_gemv_batch1_with_bias(name, out_features, isa):
    """The decode step's GEMV (one token): two-row passes, an odd last row, rows split
    over several pool tasks, a bias, and rows of many blocks."""
    _check_linear(name, 1, out_features, 9 if ALL_TYPES[name] < 10 else 2, bias=True)


@native
def test_quant_linear_many_rows_threads():
    """Enough rows and tokens to spread over every pool thread and token block."""
    _check_linear("Q4_K", 130, 300, 2)


@native
def test_quant_linear_rejects_bad_arguments():
    w = random_blocks(3, 8, 64)
    with pytest.raises(ValueError, match="ggml_type"):
        ops.quant_linear(torch.randn(2, 64), w, 99)
    with pytest.raises(ValueError, match="weight"):
        ops.quant_linear(torch.randn(2, 96), w, 3)       # 96 weights need 60 bytes per row, not 40
    with pytest.raises(ValueError, match="block size"):
        ops.quant_linear(torch.randn(2, 48), w, 3)
    with pytest.raises(TypeError, match="x"):
        ops.quant_linear(torch.randn(2, 64, dtype=torch.float64), w, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(ALL_TYPES))
@pytest.mark.parametrize("tokens,out_features,blocks", [(1, 37, 3), (11, 130, 2)])
def test_quant_linear_cuda(name, tokens, out_features, blocks):
    _check_linear(name, tokens, out_features, blocks, device="cuda", bias=True)


def _linear_in_child(queue, x, w, want):
    # No torch math here: torch's own OpenMP pool may hang in a forked child.
    first = ops.quant_linear(x, w, 3)          # inline: the parent's workers are gone
    torch.set_num_threads(3)                   # next call resizes the pool in the child
    second = ops.quant_linear(x, w, 3)
    queue.put([first.tolist(), second.tolist()])


@native
def test_quant_linear_in_a_forked_child():
    """A fork()ed child (multiprocessing's default on Linux) has none of the pool's
    threads; its calls must still run (inline, then on a new pool)."""
    import multiprocessing
    w = random_blocks(3, 640, 96, seed=1)
    x = torch.randn(2, 96)
    want = torch.empty(2, 640, dtype=torch.float64)
    reference.quant_linear(want, x, w, 3)
    ops.quant_linear(x, w, 3)                            # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_linear_in_child, args=(queue, x, w, want))
    child.start()
    results = queue.get(timeout=60)
    child.join(30)
    assert child.exitcode == 0
    for got in results:
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-4, atol=1e-4)
