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
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * _magnitude(x, w, t))


def _magnitude(x, w, ggml_type) -> float:
    """max over outputs of sum |x_k| |w_k|: what fp32 rounding in a dot is relative to
    (|y| alone can be far smaller, where the terms cancel)."""
    return (x.abs().double() @ reference.quant_dequantize(w, ggml_type, x.shape[1]).abs().T).max().item()


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
def test_quant_linear_many_rows_threads(fp32_activations):
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
def test_quant_linear_in_a_forked_child(fp32_activations):
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


INT8_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]
K_QUANTS = ("Q4_K", "Q6_K")


@pytest.fixture
def int8_avx2():
    """The AVX2 build with int8 activations (the default), restored afterwards."""
    if ops.quant_cpu_isa() != "avx2":
        pytest.skip("this CPU has no AVX2+FMA")
    ops.set_cpu_int8_activations(True)
    yield
    ops.set_cpu_int8_activations(True)


def test_quantize_activations_q8_matches_gguf_q8_0():
    """The rounding the int8 GEMV does is ggml's Q8_0 quantization of x (with the scale
    kept in fp32, where Q8_0 stores fp16): its int8 values checked against the gguf
    package's quantize (ties and last-ulp products aside: a rare one-step difference), and
    a hand-computed block."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    x = torch.randn(3, 96) * torch.tensor([0.01, 1.0, 300.0]).unsqueeze(1)
    blocks = x.reshape(9, 32)
    d = (blocks.abs().amax(dim=1, keepdim=True) / 127).double()
    got_q = (reference.quantize_activations_q8(x).reshape(9, 32) / d).round()
    packed = quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(9, 34)
    want_q = torch.from_numpy(packed[:, 2:].copy().view(np.int8).astype(np.float64))
    assert (got_q - want_q).abs().max() <= 1
    assert (got_q == want_q).double().mean() > 0.99
    hand = torch.zeros(1, 32)
    hand[0, :4] = torch.tensor([127.0, -63.4, 0.6, -0.5])     # d = 1: round half to even
    assert reference.quantize_activations_q8(hand)[0, :4].tolist() == [127.0, -63.0, 1.0, -0.0]


def _s_rounding(w, ggml_type, x):
    """[N] bound on what ggml's fp16 s = d * sum(q) (Q4_1 / Q5_1: it multiplies each block's
    minimum m) moves y by, against sum(q) * fp16(d): sum over blocks of |m| * |s - sum(q) d|."""
    if ggml_type not in (3, 7):
        return torch.zeros(w.shape[0], dtype=torch.float64)
    block_bytes = reference.GGML_BLOCKS[ggml_type][1]
    m = torch.from_numpy(w.numpy().reshape(w.shape[0], -1, block_bytes)[:, :, 2:4].copy().view(np.float16))
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1)
    q_sum = torch.round(blocks * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)).unsqueeze(1)).sum(1)
    d32 = amax / 127.0
    s16 = (d32 * q_sum).half().double()
    err = (s16 - q_sum.double() * d32.half().double()).abs()          # [blocks]
    return (m.double().reshape(w.shape[0], -1).abs() * err).sum(1)


@native
@pytest.mark.parametrize("name", INT8_TYPES)
@pytest.mark.parametrize("out_features", [1, 2, 301])
def test_quant_gemv_int8_activations(name, out_features, int8_avx2):
    """Batch-1 GEMV with int8 activations: equal to the float64 product of the dequantized
    weights with the Q8-rounded x (exact integer sums: fp32 rounding, and the _1 types'
    fp16 s), and within the rounding's reach of the exact product."""
    t = ALL_TYPES[name]
    k_quant = name in K_QUANTS
    K = 256 * 3 if k_quant else 32 * 9
    w = random_blocks(t, out_features, K, seed=out_features)
    x = torch.randn(1, K)
    b = torch.randn(out_features)
    got = ops.quant_linear(x, w, t, b).double()
    want_q8, want_exact = (torch.empty(1, out_features, dtype=torch.float64) for _ in range(2))
    rounded = reference.quantize_activations_q8k(x) if k_quant else reference.quantize_activations_q8(x)
    reference.quant_linear(want_q8, rounded, w, t, b)
    reference.quant_linear(want_exact, x, w, t, b)
    scale = want_exact.abs().max().item()
    torch.testing.assert_close(got, want_q8, rtol=1e-4, atol=1e-5 * scale + _s_rounding(w, t, x).max().item())
    # |x_i - rounded x_i| <= half a step d / 2 (d = max|x| / 127 of its block) plus |q| <= 127
    # times d's fp16 rounding (2^-11 d): the most that moves y.
    block = 256 if k_quant else 32
    half_step = (x.reshape(-1, block).abs().amax(dim=1) / 127 * (0.5 + 127 * 2**-11)).repeat_interleave(block).double()
    bound = reference.quant_dequantize(w, t, K).abs() @ half_step
    assert ((got - want_exact).abs()[0] <= bound * 1.01 + 1e-5 * scale + _s_rounding(w, t, x)).all()


@native
@pytest.mark.parametrize("name", INT8_TYPES)
@pytest.mark.parametrize("tokens", [2, 5, 63, 64, 70])
def test_int8_activations_every_token_as_alone(name, tokens, int8_avx2):
    """Several tokens in one call (prefill chunks, batched decode): each row of x rounded as
    the batch-1 GEMV rounds it, and each output row equal to that token's GEMV bit for
    bit (so a token's numbers do not depend on what shares its step); 64+ tokens span
    token blocks and the 4-token passes' remainders."""
    t = ALL_TYPES[name]
    K = 256 * 2 if name in K_QUANTS else 32 * 5
    w = random_blocks(t, 37, K, seed=tokens)
    x = torch.randn(tokens, K + 3)[:, :K]                 # a strided view, as q/k/v splits are
    b = torch.randn(37)
    got = ops.quant_linear(x, w, t, b)
    alone = torch.cat([ops.quant_linear(x[i:i + 1], w, t, b) for i in range(tokens)])
    assert torch.equal(got, alone)
    rounded = reference.quantize_activations_q8k(x) if name in K_QUANTS else reference.quantize_activations_q8(x)
    want = torch.empty(tokens, 37, dtype=torch.float64)
    reference.quant_linear(want, rounded, w, t, b)
    s_bound = max(_s_rounding(w, t, x[i:i + 1].contiguous()).max().item() for i in range(tokens))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * _magnitude(x, w, t) + s_bound)


@native
def test_int8_activations_switch_restores_the_exact_path(int8_avx2):
    w = random_blocks(6, 64, 256, seed=3)
    x = torch.randn(1, 256)
    want = torch.empty(1, 64, dtype=torch.float64)
    reference.quant_linear(want, x, w, 6)
    ops.set_cpu_int8_activations(False)
    torch.testing.assert_close(ops.quant_linear(x, w, 6).double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    ops.set_cpu_int8_activations(True)
    assert not torch.allclose(ops.quant_linear(x, w, 6).double(), want, rtol=1e-6, atol=0)


def _ggml_cpu():
    """llama.cpp's own CPU library (from llama-cpp-python, a benchmark dependency), or None."""
    import ctypes
    import importlib.util
    import pathlib
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / "lib" / "libggml-cpu.so"
    if not path.exists():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_cpu_init()
    return lib


@native
@pytest.mark.parametrize("name,vec_dot_type", [("Q4_0", "q8_0"), ("Q4_1", "q8_1"), ("Q5_0", "q8_0"),
                                               ("Q5_1", "q8_1"), ("Q8_0", "q8_0"), ("Q4_K", "q8_K"),
                                               ("Q6_K", "q8_K")])
def test_int8_gemv_is_ggml_vec_dot(name, vec_dot_type, int8_avx2):
    """With llama.cpp installed: each output equals ggml's own quantize_row_q8_x + vec_dot
    on the same row, bit for bit (the arithmetic the int8 path copies), for one token and
    for several in one call (llama.cpp's mul_mat rounds every row of a batch the same way)."""
    import ctypes
    lib = _ggml_cpu()
    if lib is None:
        pytest.skip("llama-cpp-python (its libggml-cpu) is not installed")
    t, N = ALL_TYPES[name], 9
    K = 1536 if name in K_QUANTS else 576
    w = random_blocks(t, N, K, seed=5)
    vec_dot = getattr(lib, f"ggml_vec_dot_{name[0].lower() + name[1:]}_{vec_dot_type}")
    y_bytes = {"q8_0": K // 32 * 34, "q8_1": K // 32 * 36, "q8_K": K // 256 * 292}[vec_dot_type]
    for tokens in (1, 6):   # the GEMV, and a multi-token call (4-token passes and a remainder)
        x = torch.randn(tokens, K)
        want = []
        for i in range(tokens):
            xq = (ctypes.c_uint8 * y_bytes)()
            getattr(lib, f"quantize_row_{vec_dot_type}")(x[i].numpy().ctypes.data_as(ctypes.c_void_p), xq,
                                                         ctypes.c_int64(K))
            for n in range(N):
                row, s = w[n].numpy().copy(), ctypes.c_float()
                vec_dot(ctypes.c_int(K), ctypes.byref(s), ctypes.c_size_t(0), row.ctypes.data_as(ctypes.c_void_p),
                        ctypes.c_size_t(0), xq, ctypes.c_size_t(0), ctypes.c_int(1))
                want.append(s.value)
        assert ops.quant_linear(x, w, t).flatten().tolist() == want
