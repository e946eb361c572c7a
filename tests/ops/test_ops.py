"""Every native op against its float64 torch reference (fastllm.reference)."""
import os
import subprocess
import sys

import pytest
import torch

from fastllm import ops, reference

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make_paged_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Random query/caches and a batch whose block tables point at shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for s, nb in enumerate(blocks_per_seq):
        block_tables[s, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    T = int(query_start_loc[-1])
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    q = rnd(T, num_heads, head_dim)
    k_cache = rnd(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = rnd(num_blocks, block_size, num_kv_heads, head_dim)
    meta = (block_tables, torch.tensor(seq_lens, dtype=torch.int32), query_start_loc)
    return [t.to(device) for t in (q, k_cache, v_cache, *meta)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (48, 5)])
def test_paged_attention_matches_float64(device, dtype, group, head_dim, block_size):
    num_kv_heads = 2
    # decode (q_len 1), a whole prompt, a chunk continuing a prefix (prefix-cache hit / chunked prefill)
    seq_lens, q_lens = [1, 37, 29, 70], [1, 37, 11, 1]
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, num_kv_heads * group, num_kv_heads,
                                              head_dim, block_size, dtype, device)
    out = torch.empty_like(q)
    scale = head_dim ** -0.5
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, scale)
    ref = torch.empty(q.shape, dtype=torch.float64)
    reference.paged_attention(ref, q.double().cpu(), kc.double().cpu(), vc.double().cpu(), bt.cpu(), sl.cpu(),
                              qsl.cpu(), scale)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def test_paged_attention_reference_equals_dense_causal_attention():
    # The oracle itself against torch SDPA on contiguous K/V: one sequence, prefill.
    q, kc, vc, bt, sl, qsl = make_paged_batch([21], [21], 4, 2, 16, 4, torch.float64, "cpu", seed=3)
    ref = torch.empty_like(q)
    reference.paged_attention(ref, q, kc, vc, bt, sl, qsl, 0.25)
    k = reference.gather_kv(kc, bt[0], 21).repeat_interleave(2, dim=1)
    v = reference.gather_kv(vc, bt[0], 21).repeat_interleave(2, dim=1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(ref, dense)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reshape_and_cache_writes_slots(device, dtype):
    g = torch.Generator().manual_seed(1)
    T, Hkv, D, num_blocks, block_size = 13, 3, 40, 9, 4
    key = torch.randn(T, Hkv, D, generator=g).to(dtype).to(device)
    value = torch.randn(T, Hkv, D, generator=g).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[[2, 7]] = -1  # padding rows are skipped
    slots = slots.to(device)
    k_cache = torch.zeros(num_blocks, block_size, Hkv, D, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone().cpu(), v_cache.clone().cpu()
    ops.reshape_and_cache(key, value, k_cache, v_cache, slots)
    reference.reshape_and_cache(key.cpu(), value.cpu(), k_ref, v_ref, slots.cpu())
    assert torch.equal(k_cache.cpu(), k_ref) and torch.equal(v_cache.cpu(), v_ref)
    assert k_ref.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# Row lengths for every CUDA path: warp per row (<= 1024), the row in a CTA's registers
# (aligned, <= 4096 16-byte chunks), two passes with 16-byte accesses (longer aligned rows),
# and the scalar two-pass kernel (rows not a multiple of 16 bytes).
@pytest.mark.parametrize("shape,causal_offset", [((3, 17, 17), 0), ((2, 5, 33), 28), ((4, 6, 9), -2),
                                                 ((7, 1000), None), ((3, 131), None),
                                                 ((2, 40, 2048), 2008), ((3, 8192), None),
                                                 ((2, 3, 2050), 5), ((2, 20000), None)])
def test_fused_softmax_matches_float64(device, dtype, shape, causal_offset):
    scores = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 4).to(dtype).to(device)
    out = torch.empty_like(scores)
    ops.fused_softmax(out, scores, 0.7, causal_offset)
    ref = torch.empty(shape, dtype=torch.float64)
    reference.fused_softmax(ref, scores.double().cpu(), 0.7, causal_offset)
    assert rel_err(out.cpu(), ref) < TOL[dtype]
    assert not torch.isnan(out).any()
    if causal_offset is not None and causal_offset < 0:
        assert torch.all(out[..., : -causal_offset, :] == 0)  # fully masked rows are zeros


def test_fused_softmax_reference_equals_torch_softmax():
    x = torch.randn(4, 9, 9, dtype=torch.float64)
    ref = torch.empty_like(x)
    reference.fused_softmax(ref, x, 0.5, 0)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    torch.testing.assert_close(ref, torch.softmax((x * 0.5).masked_fill(mask, float("-inf")), dim=-1))


def _attention_args(dtype=torch.float32):
    q, kc, vc, bt, sl, qsl = make_paged_batch([5, 9], [5, 1], 4, 2, 16, 4, dtype, "cpu")
    return dict(out=torch.empty_like(q), query=q, k_cache=kc, v_cache=vc, block_tables=bt, seq_lens=sl,
                query_start_loc=qsl, scale=0.25)


@pytest.mark.parametrize("change,error,words", [
    (dict(query=lambda a: a["query"].half()), TypeError, "out"),
    (dict(k_cache=lambda a: a["k_cache"].to(torch.bfloat16)), TypeError, "k_cache"),
    (dict(block_tables=lambda a: a["block_tables"].long()), TypeError, "block_tables"),
    (dict(out=lambda a: a["out"][:, :3]), ValueError, "out"),
    (dict(seq_lens=lambda a: a["seq_lens"][:1]), ValueError, "seq_lens"),
    (dict(query=lambda a: a["query"][:, :3].contiguous(), out=lambda a: a["out"][:, :3].contiguous()),
     ValueError, "num_heads"),
    (dict(query_start_loc=lambda a: torch.tensor([0, 2, 7], dtype=torch.int32)), ValueError, "query_start_loc"),
    (dict(block_tables=lambda a: a["block_tables"] + 1000), ValueError, "block_tables"),
])
def test_paged_attention_bad_inputs_name_the_argument(change, error, words):
    args = _attention_args()
    for name, fn in change.items():
        args[name] = fn(args)
    with pytest.raises(error, match=words):
        ops.paged_attention(**args)


def test_reshape_and_cache_bad_inputs():
    key = torch.randn(4, 2, 8)
    kc = torch.zeros(3, 4, 2, 8)
    with pytest.raises(TypeError, match="slot_mapping"):
        ops.reshape_and_cache(key, key, kc, kc.clone(), torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.reshape_and_cache(key, key, kc, kc.clone(), torch.tensor([0, 1, 2, 12]))
    with pytest.raises(ValueError, match="head_dim"):
        ops.reshape_and_cache(key, key, torch.zeros(3, 4, 2, 9), torch.zeros(3, 4, 2, 9), torch.arange(4))
    with pytest.raises(ValueError, match="shape"):
        ops.fused_softmax(torch.empty(3, 4), torch.randn(3, 5))


def test_build_reports_no_gpu_here_consistently():
    info = ops.build_info()
    assert info["native"] is True
    assert ops.cuda_available() == (info["cuda"] and torch.cuda.is_available())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens,q_lens", [([3000], [1]), ([1500, 700], [1, 3]), ([2100, 40], [5, 40])])
def test_paged_attention_split_context_matches_float64(dtype, seq_lens, q_lens):
    # Few CTAs and long contexts: the CUDA launcher splits the keys and merges partials.
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, 8, 2, 128, 16, dtype, "cuda", seed=5)
    plan = ops._plan_call(q, kc, bt, None)
    assert plan.kernels.num_splits > 1 and plan.workspace.numel() * 4 >= plan.kernels.workspace_bytes > 0
    out = torch.empty_like(q)
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, 128 ** -0.5, plan=plan)
    ref = torch.empty(q.shape, dtype=torch.float64)
    reference.paged_attention(ref, q.double().cpu(), kc.double().cpu(), vc.double().cpu(), bt.cpu(), sl.cpu(),
                              qsl.cpu(), 128 ** -0.5)
    assert rel_err(out.cpu(), ref) < TOL[dtype]


def _reference_attention(q, kc, vc, bt, sl, qsl, scale):
    ref = torch.empty(q.shape, dtype=torch.float64)
    reference.paged_attention(ref, q.double().cpu(), kc.double().cpu(), vc.double().cpu(), bt.cpu(), sl.cpu(),
                              qsl.cpu(), scale)
    return ref


# Mixed steps as the scheduler builds them: decodes, whole prompts (a 2-token one, one
# crossing several 64-row tiles), and chunks extending a cached prefix (chunked prefill,
# prefix-cache hits), with contexts that end mid-block and mid-tile.
PREFILL_BATCHES = [
    ([1, 200, 370, 2, 9], [1, 200, 70, 2, 1]),
    ([130], [65]),
    ([64, 64], [64, 1]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,num_kv_heads", [(1, 2), (3, 3), (4, 2), (8, 1)])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
@pytest.mark.parametrize("batch", range(len(PREFILL_BATCHES)))
def test_paged_attention_prefill_matches_float64(device, dtype, group, num_kv_heads, head_dim, block_size, batch):
    # On CUDA (fp16/bf16), sequences whose q_len * group fills a 64-row tile run on the
    # tensor-core prefill kernel and the rest on the decode kernel; the max_query_len hint
    # only picks kernels, never results.
    seq_lens, q_lens = PREFILL_BATCHES[batch]
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, num_kv_heads * group, num_kv_heads,
                                              head_dim, block_size, dtype, device, seed=7 + batch)
    scale = head_dim ** -0.5
    ref = _reference_attention(q, kc, vc, bt, sl, qsl, scale)
    for hint in (None, max(q_lens), 1):
        out = torch.full_like(q, float("nan"))
        ops.paged_attention(out, q, kc, vc, bt, sl, qsl, scale, max_query_len=hint)
        assert rel_err(out.cpu(), ref) < TOL[dtype], f"max_query_len={hint}"
        # every row, not just the norm: no token left unwritten or written by the wrong kernel
        row_err = (out.cpu().double() - ref).abs().amax(dim=(1, 2)) / ref.abs().amax().clamp_min(1e-12)
        assert row_err.max().item() < 10 * TOL[dtype], f"max_query_len={hint}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_attention_long_prefill_on_tensor_cores(dtype):
    # A 2k prompt (32 key tiles per CTA at the end) next to a 1.5k extend of a 2.5k prefix.
    q, kc, vc, bt, sl, qsl = make_paged_batch([2048, 4000], [2048, 1500], 32, 8, 128, 16, dtype, "cuda", seed=11)
    out = torch.empty_like(q)
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, 128 ** -0.5, max_query_len=2048)
    assert rel_err(out.cpu(), _reference_attention(q, kc, vc, bt, sl, qsl, 128 ** -0.5)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_takes_query_views_of_the_qkv_projection(device, dtype):
    # The model passes q as a view into [T, (H + 2 Hkv) * D]: token stride != H * D.
    H, Hkv, D = 8, 2, 64
    q, kc, vc, bt, sl, qsl = make_paged_batch([40, 9, 1], [40, 1, 1], H, Hkv, D, 16, dtype, device, seed=2)
    qkv = torch.randn(q.shape[0], (H + 2 * Hkv) * D, dtype=dtype, device=device)
    qkv[:, :H * D] = q.flatten(1)
    view = qkv[:, :H * D].view(-1, H, D)
    assert not view.is_contiguous()
    out, expected = torch.empty_like(q), torch.empty_like(q)
    ops.paged_attention(out, view, kc, vc, bt, sl, qsl, 0.125, max_query_len=40)
    ops.paged_attention(expected, q, kc, vc, bt, sl, qsl, 0.125, max_query_len=40)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert rel_err(out.cpu(), _reference_attention(q, kc, vc, bt, sl, qsl, 0.125)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group,num_kv_heads", [(4, 2), (16, 1)])
def test_paged_attention_reads_only_each_sequences_own_keys(device, group, num_kv_heads):
    # 40 prompts/extends (more than one warp's worth of sequences for the prefill tile
    # search), with every cache slot outside a sequence's first seq_len positions NaN:
    # any read past seq_len, or of another sequence's blocks, poisons the output.
    q_lens = [16 + (i % 5) * 7 for i in range(40)]
    seq_lens = [q + (i % 3) * 23 for i, q in enumerate(q_lens)]
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, num_kv_heads * group, num_kv_heads, 64, 16,
                                              torch.bfloat16, device, seed=13)
    owned = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    for s, n in enumerate(seq_lens):
        pos = torch.arange(n)
        owned[bt[s].cpu().long()[pos // 16] * 16 + pos % 16] = True
    for cache in (kc, vc):
        cache.view(-1, *cache.shape[2:])[~owned.to(device)] = float("nan")
    out = torch.empty_like(q)
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, 0.125, max_query_len=max(q_lens))
    assert not out.isnan().any()
    assert rel_err(out.cpu(), _reference_attention(q, kc, vc, bt, sl, qsl, 0.125)) < TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.skipif(not ops.torch_paged_attention_available(), reason="torch has no paged varlen_attn")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_torch_prefill_backend_matches_float64(dtype, block_size):
    # The alternative prefill path (FASTLLM_PREFILL_BACKEND=torch) keeps paged_attention's
    # contract: queries are the last q_len positions (bottom-right causal alignment).
    seq_lens, q_lens = PREFILL_BATCHES[0]
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, 32, 8, 128, block_size, dtype, "cuda", seed=21)
    out = torch.empty_like(q)
    try:
        ops.torch_paged_attention(out, q, kc, vc, bt, sl, qsl, 128 ** -0.5, max(q_lens))
    except RuntimeError as e:
        pytest.skip(f"this torch refuses the case: {e}")
    assert rel_err(out.cpu(), _reference_attention(q, kc, vc, bt, sl, qsl, 128 ** -0.5)) < TOL[dtype]


def test_prefill_backend_is_read_when_planning_not_at_import(monkeypatch):
    # No import-time side effects: a bad value fails the first plan it could apply to (a
    # CUDA fp16/bf16 step with prompts; read before any device is touched), naming it.
    env = {**os.environ, "FASTLLM_PREFILL_BACKEND": "flashy"}
    proc = subprocess.run([sys.executable, "-c", "import fastllm.ops"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("FASTLLM_PREFILL_BACKEND", "flashy")
    with pytest.raises(ValueError, match="FASTLLM_PREFILL_BACKEND='flashy'"):
        ops.plan_attention(num_tokens=9, num_seqs=2, max_blocks_per_seq=3, max_query_len=5, num_heads=4,
                           num_kv_heads=2, head_dim=64, block_size=4, dtype=torch.float16, device="cuda")


def _plan_for(q, kc, bt, max_query_len):
    return ops.plan_attention(num_tokens=q.shape[0], num_seqs=bt.shape[0], max_blocks_per_seq=bt.shape[1],
                              max_query_len=max_query_len, num_heads=q.shape[1], num_kv_heads=kc.shape[2],
                              head_dim=q.shape[2], block_size=kc.shape[1], dtype=q.dtype, device=q.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_plan_serves_every_layer_of_a_step(device, dtype):
    # A step planned once, then run over three layers' caches: each layer's output is what
    # a call planned on its own gives (bit for bit: the same kernels on the same inputs).
    seq_lens, q_lens = [1, 200, 370, 2, 9], [1, 200, 70, 2, 1]
    layers = [make_paged_batch(seq_lens, q_lens, 8, 2, 64, 16, dtype, device, seed=50 + i) for i in range(3)]
    q0, kc0, _, bt, sl, qsl = layers[0]
    plan = _plan_for(q0, kc0, bt, max(q_lens))
    assert plan.backend == "native"
    for q, kc, vc, _, _, _ in layers:
        out, alone = torch.empty_like(q), torch.empty_like(q)
        ops.paged_attention(out, q, kc, vc, bt, sl, qsl, 0.125, plan=plan)
        ops.paged_attention(alone, q, kc, vc, bt, sl, qsl, 0.125, max_query_len=max(q_lens))
        assert torch.equal(out, alone)
        assert rel_err(out.cpu(), _reference_attention(q, kc, vc, bt, sl, qsl, 0.125)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_a_plan_made_for_other_sizes_is_refused(device):
    # The plan's split layout and workspace size hold only for the sizes it was made for.
    q, kc, vc, bt, sl, qsl = make_paged_batch([5, 9], [5, 1], 4, 2, 64, 4, torch.float32, device)
    plan = _plan_for(q, kc, bt, 5)
    q2, kc2, vc2, bt2, sl2, qsl2 = make_paged_batch([5, 9, 3], [5, 1, 1], 4, 2, 64, 4, torch.float32, device)
    with pytest.raises(ValueError, match="plan: made for num_tokens=6 num_seqs=2"):
        ops.paged_attention(torch.empty_like(q2), q2, kc2, vc2, bt2, sl2, qsl2, 0.25, plan=plan)
    with pytest.raises(ValueError, match="plan: made for .* float32"):
        ops.paged_attention(torch.empty_like(q).half(), q.half(), kc.half(), vc.half(), bt, sl, qsl, 0.25, plan=plan)


def test_plan_sizes_are_checked():
    base = dict(num_tokens=3, num_seqs=1, max_blocks_per_seq=1, max_query_len=3, num_heads=4, num_kv_heads=2,
                head_dim=64, block_size=16, dtype=torch.float32, device="cpu")
    for field, value, words in [("num_kv_heads", 3, "multiple of num_kv_heads"), ("block_size", 0, "block_size"),
                                ("num_tokens", -1, "num_tokens")]:
        with pytest.raises(ValueError, match=words):
            ops.plan_attention(**{**base, field: value})
    with pytest.raises(TypeError, match="dtype"):
        ops.plan_attention(**{**base, "dtype": torch.int32})


def test_python_head_dims_are_the_ones_cpp_enforces():
    # ops.PAGED_ATTENTION_HEAD_DIMS is read from C++'s table; the CUDA planner refuses the
    # rest by that same table (before touching a GPU, so this runs anywhere).
    assert ops.PAGED_ATTENTION_HEAD_DIMS and all(d % 16 == 0 for d in ops.PAGED_ATTENTION_HEAD_DIMS)
    for head_dim in range(16, 272, 16):
        try:
            ops._C.plan_paged_attention("bfloat16", 4, 1, 4, 2, head_dim, 16, 1, 4, 0)
            refused = ""
        except (ValueError, RuntimeError) as e:
            refused = str(e)
        assert refused.startswith("head_dim:") == (head_dim not in ops.PAGED_ATTENTION_HEAD_DIMS), refused
    assert str(ops.PAGED_ATTENTION_HEAD_DIMS[-1]) in refused or not refused


@pytest.mark.cuda
def test_cuda_plan_picks_kernels_splits_and_workspace():
    base = dict(num_seqs=1, max_blocks_per_seq=256, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                device="cuda")
    # batch-1 decode over a 4k context: split, with a workspace for the partials
    decode = ops.plan_attention(num_tokens=1, max_query_len=1, dtype=torch.bfloat16, **base).kernels
    assert not decode.prefill_kernel and decode.num_splits > 1
    assert decode.workspace_bytes == 1 * 32 * decode.num_splits * (128 + 2) * 4
    assert decode.keys_per_split % 256 == 0 and decode.keys_per_split * decode.num_splits >= 4096
    # a 4k prompt: tensor cores in bf16, none in fp32; unknown max_query_len assumes a prompt may be there
    prompt = dict(base, num_tokens=4096)
    assert ops.plan_attention(max_query_len=4096, dtype=torch.bfloat16, **prompt).kernels.prefill_kernel
    assert ops.plan_attention(max_query_len=None, dtype=torch.bfloat16, **prompt).kernels.prefill_kernel
    assert not ops.plan_attention(max_query_len=4096, dtype=torch.float32, **prompt).kernels.prefill_kernel
    # 256 decodes fill the GPU: no split, no workspace
    wide = ops.plan_attention(**dict(base, num_tokens=256, num_seqs=256), max_query_len=1, dtype=torch.bfloat16)
    assert wide.kernels.num_splits == 1 and wide.kernels.workspace_bytes == 0 and wide.workspace is None
    # no CUDA kernel for head_dim 48: the torch reference, planned as such
    assert ops.plan_attention(**dict(base, head_dim=48), num_tokens=1, max_query_len=1,
                              dtype=torch.bfloat16).backend == "reference"
