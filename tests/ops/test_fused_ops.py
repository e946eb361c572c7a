"""The fused decoder-layer ops (rms_norm, fused_add_rms_norm, silu_and_mul,
rotary_embedding) and reshape_and_cache on strided views of the qkv buffer.

On CPU, fastllm.ops runs fp32 C++ kernels (cpp/src/cpu_fused_ops*.cc) and, for fp16/bf16,
the torch reference after the C++ argument checks: those tests hold both to an
independent float64 formula (within the dtype's rounding), the reference to HF's own
layer code (bit for bit; float32 silu within an ulp) and the fp32 kernels to it within
a few ulps.
The cuda-marked tests hold the CUDA kernels to the same float64 formulas, on aligned
rows (16-byte vector path), odd sizes and offset pointers (scalar path) and strided
views of a fused qkv buffer.
"""
import pytest
import torch

from fastllm import ops, reference

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EPS = 1e-5


def rel_err(x, ref):
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def randn(*shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def offset_rows(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data starts one element past an allocation: not
    16-byte aligned, so the CUDA kernels must take their scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


# -- independent float64 formulas ---------------------------------------------------------

def rms_norm_f64(x, weight):
    x = x.double().cpu()
    return weight.double().cpu() * x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + EPS)


def silu_and_mul_f64(x):
    x = x.double().cpu()
    gate, up = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
    return gate * torch.sigmoid(gate) * up


def rotate_f64(x, cos, sin):
    """Rotate-half RoPE as a complex product: (x1 + i x2) * (cos + i sin) per pair."""
    x = x.double().cpu()
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    rot = torch.complex(cos.double().cpu(), sin.double().cpu()).unsqueeze(1)   # [T, 1, D/2]
    z = z * rot
    return torch.cat((z.real, z.imag), dim=-1)


def cos_sin(num_tokens, head_dim, dtype, device="cpu", seed=0):
    """cos, sin [T, D/2] of random positions and Llama's frequencies, in the dtype."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    angles = torch.outer(positions, inv_freq)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device="cpu", seed=0, pad=0):
    """A fused qkv buffer [T, H*D + 2*Hkv*D (+ pad)] and its q, k, v views [T, heads, D]."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size + pad, dtype=dtype, device=device, seed=seed)
    q, k, v = qkv[:, : q_size + 2 * kv_size].split([q_size, kv_size, kv_size], dim=-1)
    return (qkv, q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


# -- rms_norm / fused_add_rms_norm ---------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 4096), (7, 1000), (5, 37), (130, 64), (2, 16384)])
def test_rms_norm_matches_float64(device, dtype, num_tokens, hidden):
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=1, scale=3.0)
    weight = randn(hidden, dtype=dtype, device=device, seed=2)
    out = torch.empty_like(x)
    ops.rms_norm(out, x, weight, EPS)
    assert rel_err(out, rms_norm_f64(x, weight)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 4096), (7, 1000), (5, 37), (130, 64)])
def test_fused_add_rms_norm_matches_float64(device, dtype, num_tokens, hidden):
    x = randn(num_tokens, hidden, dtype=dtype, device=device, seed=3)
    residual = randn(num_tokens, hidden, dtype=dtype, device=device, seed=4, scale=2.0)
    weight = randn(hidden, dtype=dtype, device=device, seed=5)
    summed = x.double().cpu() + residual.double().cpu()
    x_in = x.clone()
    ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert rel_err(residual, summed) < TOL[dtype]
    assert rel_err(x, rms_norm_f64(summed, weight)) < TOL[dtype]
    # The sum is rounded to the dtype before normalising (HF adds the residual in the
    # model dtype): x is exactly rms_norm of the residual the op wrote.
    again = torch.empty_like(x)
    ops.rms_norm(again, residual, weight, EPS)
    assert torch.equal(again, x)
    assert not torch.equal(x, x_in)


@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_rms_norm_reference_is_hf_llama_rms_norm(impl):
    # reference: HF's rounding points (bit-equal with torch 2.13; an ulp of slack for torch
    # versions whose F.rms_norm sums in another order than HF's mean). ops: what the model
    # runs (fp32 on CPU: the C++ kernel, a few ulps from HF's order of operations).
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    lib = reference if impl == "reference" else ops
    for dtype in DTYPES:
        norm = LlamaRMSNorm(96, eps=EPS).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(randn(96, dtype=dtype, seed=6))
            x = randn(11, 96, dtype=dtype, seed=7, scale=5.0)
            residual = randn(11, 96, dtype=dtype, seed=8)
            out = torch.empty_like(x)
            lib.rms_norm(out, x, norm.weight, EPS)
            ulp = torch.finfo(dtype).eps * (4 if impl == "ops" and dtype == torch.float32 else 1)
            torch.testing.assert_close(out, norm(x), rtol=ulp, atol=0)
            hf_residual = residual + x                      # HF: hidden = residual + hidden
            hf_normed = norm(hf_residual)
            lib.fused_add_rms_norm(x, residual, norm.weight, EPS)
            assert torch.equal(residual, hf_residual)
            torch.testing.assert_close(x, hf_normed, rtol=ulp, atol=0)


# -- silu_and_mul --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 14336), (9, 1000), (4, 37), (65, 24)])
def test_silu_and_mul_matches_float64(device, dtype, num_tokens, inter):
    x = randn(num_tokens, 2 * inter, dtype=dtype, device=device, seed=9, scale=3.0)
    out = torch.empty(num_tokens, inter, dtype=dtype, device=device)
    ops.silu_and_mul(out, x)
    assert rel_err(out, silu_and_mul_f64(x)) < TOL[dtype]


@pytest.mark.parametrize("impl", ["reference", "ops"])
def test_silu_and_mul_reference_is_hf_llama_mlp(impl):
    # LlamaMLP with down_proj = identity returns act_fn(gate_proj(x)) * up_proj(x) exactly.
    # ops in float32 on CPU is the C++ kernel (vectorized exp): a few ulps from torch's.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    size = 40
    config = LlamaConfig(hidden_size=size, intermediate_size=size, num_attention_heads=4, num_key_value_heads=4,
                         hidden_act="silu", mlp_bias=False)
    for dtype in DTYPES:
        torch.manual_seed(0)
        mlp = LlamaMLP(config).to(dtype)
        with torch.no_grad():
            mlp.down_proj.weight.copy_(torch.eye(size))
            x = randn(6, size, dtype=dtype, seed=10)
            gate_up = torch.cat((mlp.gate_proj(x), mlp.up_proj(x)), dim=-1)
            out = torch.empty(6, size, dtype=dtype)
            (reference if impl == "reference" else ops).silu_and_mul(out, gate_up)
            # Within an ulp, not bit-equal in float32: torch's CPU silu of the strided gate
            # view (the reference keeps layers.py's former math) may take another code path
            # than of HF's contiguous gate_proj output.
            ulps = 4 if impl == "ops" and dtype == torch.float32 else 1
            torch.testing.assert_close(out, mlp(x), rtol=ulps * torch.finfo(dtype).eps, atol=0)


# -- rotary_embedding ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [
    (1, 32, 8, 128), (13, 4, 2, 64), (6, 3, 1, 10), (40, 2, 2, 16), (3, 64, 8, 128)])
def test_rotary_embedding_on_qkv_views_matches_float64(device, dtype, num_tokens, num_heads, num_kv_heads,
                                                       head_dim):
    qkv, q, k, v = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=11)
    cos, sin = cos_sin(num_tokens, head_dim, dtype, device, seed=12)
    q_ref, k_ref = rotate_f64(q, cos, sin), rotate_f64(k, cos, sin)
    v_before = v.clone()
    ops.rotary_embedding(q, k, cos, sin)
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(v, v_before)                          # the rest of the buffer untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_contiguous_and_padded_rows(device, dtype):
    # Contiguous q and k, and views whose token stride (pad 3) breaks 16-byte alignment.
    for pad in (None, 3):
        if pad is None:
            q, k = randn(5, 4, 32, dtype=dtype, device=device, seed=13), randn(5, 2, 32, dtype=dtype,
                                                                               device=device, seed=14)
        else:
            _, q, k, _ = qkv_views(5, 4, 2, 32, dtype, device, seed=13, pad=pad)
        cos, sin = cos_sin(5, 32, dtype, device, seed=15)
        q_ref, k_ref = rotate_f64(q, cos, sin), rotate_f64(k, cos, sin)
        ops.rotary_embedding(q, k, cos, sin)
        assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]


def test_rotary_embedding_reference_is_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    for dtype in DTYPES:
        _, q, k, _ = qkv_views(9, 4, 2, 16, dtype, seed=16)
        half_cos, half_sin = cos_sin(9, 16, dtype, seed=17)
        # HF: q [B, H, T, D]; cos/sin [B, T, D] with both halves equal.
        hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                          torch.cat((half_cos, half_cos), -1).unsqueeze(0),
                                          torch.cat((half_sin, half_sin), -1).unsqueeze(0))
        ops.rotary_embedding(q, k, half_cos, half_sin)
        assert torch.equal(q, hf_q[0].transpose(0, 1)), dtype
        assert torch.equal(k, hf_k[0].transpose(0, 1)), dtype


# -- reshape_and_cache from qkv views ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,pad", [(2, 64, 0), (3, 10, 0), (2, 64, 1)])
def test_reshape_and_cache_from_qkv_views(device, dtype, num_kv_heads, head_dim, pad):
    num_tokens, num_heads, num_blocks, block_size = 11, 4, 6, 4
    _, _, k, v = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed=18, pad=pad)
    assert not k.is_contiguous() and not v.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(19))[:num_tokens]
    slots[4] = -1
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    ops.reshape_and_cache(k, v, k_cache, v_cache, slots.to(device))
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], k[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
    written = (k_cache != 0).flatten(2).any(-1).sum().item()
    assert written == num_tokens - 1                         # slot -1 skipped, nothing else written


# -- CUDA kernels on unaligned rows (scalar path) -----------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_ops_on_unaligned_pointers(dtype):
    x = offset_rows(randn(3, 64, dtype=dtype, device="cuda", seed=20))
    residual = offset_rows(randn(3, 64, dtype=dtype, device="cuda", seed=21))
    weight = offset_rows(randn(64, dtype=dtype, device="cuda", seed=22))
    out = offset_rows(torch.zeros(3, 64, dtype=dtype, device="cuda"))
    ops.rms_norm(out, x, weight, EPS)
    assert rel_err(out, rms_norm_f64(x, weight)) < TOL[dtype]
    summed = x.double().cpu() + residual.double().cpu()
    ops.fused_add_rms_norm(x, residual, weight, EPS)
    assert rel_err(x, rms_norm_f64(summed, weight)) < TOL[dtype]
    gate_up = offset_rows(randn(3, 128, dtype=dtype, device="cuda", seed=23))
    act = offset_rows(torch.zeros(3, 64, dtype=dtype, device="cuda"))
    ops.silu_and_mul(act, gate_up)
    assert rel_err(act, silu_and_mul_f64(gate_up)) < TOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_ops_round_like_torch(dtype):
    """The kernels round where torch's unfused ops do: RoPE (no transcendental, fma
    contraction forbidden) is bit-identical to the torch reference; silu_and_mul within
    2 ulp; rms_norm in half precision within 3 ulp (a 1-ulp flip of the normalised value,
    then the weight product's rounding). fp32 rms_norm sums squares in another order
    than torch, so only its float64 error bound (above) applies."""
    _, q, k, _ = qkv_views(17, 8, 2, 128, dtype, "cuda", seed=24)
    cos, sin = cos_sin(17, 128, dtype, "cuda", seed=25)
    q_ref, k_ref = q.clone(), k.clone()
    reference.rotary_embedding(q_ref, k_ref, cos, sin)
    ops.rotary_embedding(q, k, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)

    ulp = torch.finfo(dtype).eps
    x = randn(9, 4096, dtype=dtype, device="cuda", seed=26)
    weight = randn(4096, dtype=dtype, device="cuda", seed=27)
    out, out_ref = torch.empty_like(x), torch.empty_like(x)
    ops.rms_norm(out, x, weight, EPS)
    reference.rms_norm(out_ref, x, weight, EPS)
    if dtype != torch.float32:
        assert ((out.float() - out_ref.float()).abs() <= 3 * ulp * out_ref.float().abs()).all()
    gate_up = randn(9, 2 * 1000, dtype=dtype, device="cuda", seed=28, scale=3.0)
    act, act_ref = torch.empty(9, 1000, dtype=dtype, device="cuda"), torch.empty(9, 1000, dtype=dtype, device="cuda")
    ops.silu_and_mul(act, gate_up)
    reference.silu_and_mul(act_ref, gate_up)
    subnormal_step = torch.finfo(dtype).smallest_normal * ulp          # fp16's tail of silu
    assert ((act.float() - act_ref.float()).abs() <= 2 * ulp * act_ref.float().abs() + 2 * subnormal_step).all()


@pytest.mark.cuda
def test_cuda_bf16_model_matches_hf_layer_math():
    """fastllm's bf16 model on the GPU (fused kernels) against transformers' bf16 model
    on the same GPU: the same rounding points, so first-token logits agree closely."""
    from checkpoints import cached_checkpoint, load_hf_model
    from test_model_parity import make_prompts, paged_greedy
    from fastllm.model.loader import load_model
    assert {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"} <= set(
        ops.build_info()["cuda_ops"])
    path = cached_checkpoint("llama")
    model, config = load_model(path, dtype=torch.bfloat16, device="cuda")
    prompts = make_prompts()
    _, logits = paged_greedy(model, config, prompts, 1, block_size=16, device="cuda")
    hf = load_hf_model(path, dtype=torch.bfloat16).to("cuda")
    with torch.no_grad():
        for prompt, got in zip(prompts, logits):
            ref = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float().cpu()
            rel = (got[0] - ref).abs().max() / ref.abs().max()
            assert rel < 2e-2, f"prompt of {len(prompt)}: rel err {rel:.2e}"


# -- bad inputs name the argument (C++ checks, run for CPU tensors too) ------------------------

def _norm_args():
    return dict(out=torch.empty(4, 16), x=torch.randn(4, 16), weight=torch.randn(16), eps=EPS)


def _fused_norm_args():
    return dict(x=torch.randn(4, 16), residual=torch.randn(4, 16), weight=torch.randn(16), eps=EPS)


def _silu_args():
    return dict(out=torch.empty(4, 8), x=torch.randn(4, 16))


def _rotary_args():
    _, q, k, _ = qkv_views(4, 4, 2, 8, torch.float32)
    cos, sin = cos_sin(4, 8, torch.float32)
    return dict(query=q, key=k, cos=cos, sin=sin)


def _cache_args():
    _, _, k, v = qkv_views(4, 4, 2, 8, torch.float32)
    kc = torch.zeros(3, 4, 2, 8)
    return dict(key=k, value=v, k_cache=kc, v_cache=kc.clone(), slot_mapping=torch.arange(4))


_shared = torch.randn(96)  # one buffer, for views that partially overlap

BAD_INPUTS = [
    (ops.rms_norm, _norm_args, dict(weight=lambda a: a["weight"].half()), TypeError, "weight"),
    (ops.rms_norm, _norm_args, dict(weight=lambda a: torch.randn(15)), ValueError, "weight"),
    (ops.rms_norm, _norm_args, dict(out=lambda a: torch.empty(4, 15)), ValueError, "out"),
    (ops.rms_norm, _norm_args, dict(x=lambda a: torch.randn(16, 4).t()), ValueError, "x: expected a contiguous"),
    (ops.rms_norm, _norm_args, dict(x=lambda a: torch.randn(2, 2, 16)), ValueError, "x: expected a 2-d"),
    (ops.rms_norm, _norm_args, dict(x=lambda a: torch.ones(4, 16, dtype=torch.int32)), TypeError, "x"),
    (ops.fused_add_rms_norm, _fused_norm_args, dict(residual=lambda a: a["residual"].bfloat16()), TypeError,
     "residual"),
    (ops.fused_add_rms_norm, _fused_norm_args, dict(residual=lambda a: torch.randn(3, 16)), ValueError,
     "residual"),
    (ops.fused_add_rms_norm, _fused_norm_args, dict(residual=lambda a: a["x"]), ValueError, "residual"),
    (ops.fused_add_rms_norm, _fused_norm_args, dict(weight=lambda a: torch.randn(16, 1)), ValueError, "weight"),
    # partial overlaps of in-place operands would race on a GPU
    (ops.fused_add_rms_norm, _fused_norm_args,
     dict(x=lambda a: _shared[:64].view(4, 16), residual=lambda a: _shared[16:80].view(4, 16)), ValueError,
     "residual"),
    (ops.rms_norm, _norm_args, dict(x=lambda a: _shared[:64].view(4, 16), out=lambda a: _shared[8:72].view(4, 16)),
     ValueError, "out: overlaps"),
    (ops.silu_and_mul, _silu_args, dict(x=lambda a: torch.randn(4, 15)), ValueError, "x: the last dim"),
    (ops.silu_and_mul, _silu_args, dict(out=lambda a: torch.empty(4, 16)), ValueError, "out"),
    (ops.silu_and_mul, _silu_args, dict(x=lambda a: _shared[:64].view(4, 16), out=lambda a: _shared[8:40].view(4, 8)),
     ValueError, "out: overlaps"),
    (ops.silu_and_mul, _silu_args, dict(out=lambda a: torch.empty(4, 8, dtype=torch.float16)), TypeError, "out"),
    (ops.rotary_embedding, _rotary_args, dict(cos=lambda a: a["cos"].double()), TypeError, "cos"),
    (ops.rotary_embedding, _rotary_args, dict(sin=lambda a: torch.randn(4, 8)), ValueError, "sin"),
    (ops.rotary_embedding, _rotary_args, dict(key=lambda a: torch.randn(4, 8, 2).transpose(1, 2)), ValueError,
     "key: the \\[heads, head_dim\\] dims"),
    (ops.rotary_embedding, _rotary_args, dict(query=lambda a: a["query"].as_strided((4, 4, 8), (16, 8, 1))),
     ValueError, "query: token stride"),
    (ops.rotary_embedding, _rotary_args, dict(key=lambda a: a["query"]), ValueError, "key"),
    (ops.rotary_embedding, _rotary_args, dict(key=lambda a: a["query"][:, 2:]), ValueError, "key: must not alias"),
    (ops.rotary_embedding, _rotary_args,
     dict(query=lambda a: torch.randn(4, 4, 7), key=lambda a: torch.randn(4, 2, 7)), ValueError, "head_dim"),
    (ops.reshape_and_cache, _cache_args, dict(value=lambda a: torch.randn(4, 8, 2).transpose(1, 2)), ValueError,
     "value: the \\[heads, head_dim\\] dims"),
    (ops.reshape_and_cache, _cache_args, dict(key=lambda a: a["key"].half()), TypeError, "value"),
]


@pytest.mark.parametrize("op,make_args,change,error,words", BAD_INPUTS,
                         ids=[f"{b[0].__name__}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_name_the_argument(op, make_args, change, error, words):
    args = make_args()
    for name, fn in change.items():
        args[name] = fn(args)
    with pytest.raises(error, match=words):
        op(**args)


def test_model_runs_with_grad_mode_on():
    # The fused ops write in place; calling the model outside no_grad must still work.
    from fastllm.bench import models
    from fastllm.model.layers import AttentionMetadata, allocate_kv_caches
    lm = models.load(random_weights="tiny", device="cpu", dtype="float32")
    assert torch.is_grad_enabled() and any(p.requires_grad for p in lm.model.parameters())
    caches = allocate_kv_caches(lm.config, 4, 16)
    meta = AttentionMetadata(torch.arange(5), torch.tensor([[0]], dtype=torch.int32),
                             torch.tensor([5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32))
    logits = lm.model(torch.arange(1, 6), torch.arange(5), caches, meta)
    assert logits.shape == (1, lm.config.vocab_size) and torch.isfinite(logits).all()
