"""`python -m fastllm.bench kernels`: each fastllm kernel against the device's own ceilings
and against torch, all measured in the same run.

Cases (full size on a GPU; `--small`, automatic on a CPU, shrinks them):

- paged decode attention, batch 64 x 4k context and batch 1 x 32k context, 32 q / 8 kv
  heads, head_dim 128, block 16: bandwidth-bound, so judged by achieved GB/s.
- paged prefill and extend (queries over a cached prefix, causal with offset): judged by
  TFLOP/s against the bf16 GEMM ceiling.
- fused_softmax: scale + causal mask + softmax over attention scores [H, q, k], and the
  sampling variant (temperature + softmax over a 128k vocabulary), with one temperature
  for the batch (the scalar scale) or one per row (row_scale = 1 / t, peer
  torch.softmax(logits / t[:, None])).
- fused decoder-layer ops (result section "fused"): rms_norm, fused_add_rms_norm,
  silu_and_mul and rotary_embedding (on views of the fused qkv buffer) at Llama-3-8B
  shapes (hidden 4096, intermediate 14336, 32 / 8 heads, head_dim 128) for T = 1, 64
  and 4096 tokens, each against the torch op chain it replaced in the decoder layer.

Metrics:
  bandwidth = bytes the op must read + write (the minimum: GQA K/V once, not expanded;
              every score once in, once out) / median time
  bw_vs_copy = bandwidth / device-to-device copy bandwidth (fastllm.bench.hardware)
  tflops = FLOPs of the attention's two matmuls (causal pairs only) / median time
  speedup = peer median time / kernel median time (> 1: fastllm is faster)
Peers: the fused ops' torch chains (layers.py before the fused kernels), SDPA on contiguous K/V (GQA heads expanded, so it reads Hq/Hkv times the K/V
bytes: `own_bandwidth_GBps` counts those), torch.softmax alone, and the three-op
scale + masked_fill + softmax. Every kernel's output must match the float64 reference
(fastllm.reference) before it is timed; peers' errors are recorded (matches_reference).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional

import torch

from fastllm import ops, reference
from fastllm.bench.hardware import bench_copy, bench_gemm
from fastllm.bench.runner import median, time_op, write_json
from fastllm.utils import cdiv, check_positive_int

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_INDEX_BYTES = 4          # block_tables, seq_lens, query_start_loc are int32
# Max |got - ref| / max |ref| allowed before timing (the bf16 bound is 1e-2).
_REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class AttentionCase:
    name: str
    num_seqs: int
    seq_len: int          # tokens in the cache per sequence, this step's included
    q_len: int            # queries per sequence (1 = decode; seq_len = prefill)
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16

    @property
    def bound(self) -> str:
        return "bandwidth" if self.q_len == 1 else "compute"


@dataclass(frozen=True)
class SoftmaxCase:
    name: str
    shape: tuple          # [..., rows, cols]; softmax over cols
    scale: float
    causal: bool          # attention scores (causal_offset 0) vs sampling logits
    dtype: Optional[str] = None   # None: the run's --dtype
    row_temperature: bool = False  # per-row temperatures (row_scale) on top of scale


GPU_ATTENTION = [
    AttentionCase("decode_b64_ctx4k", num_seqs=64, seq_len=4096, q_len=1),
    AttentionCase("decode_b1_ctx32k", num_seqs=1, seq_len=32768, q_len=1),
    AttentionCase("prefill_b4_2k", num_seqs=4, seq_len=2048, q_len=2048),
    AttentionCase("extend_b4_3k+1k", num_seqs=4, seq_len=4096, q_len=1024),
]
CPU_ATTENTION = [
    AttentionCase("decode_b4_ctx512", num_seqs=4, seq_len=512, q_len=1),
    AttentionCase("decode_b1_ctx2k", num_seqs=1, seq_len=2048, q_len=1),
    AttentionCase("prefill_b2_128", num_seqs=2, seq_len=128, q_len=128),
    AttentionCase("extend_b2_192+64", num_seqs=2, seq_len=256, q_len=64),
]
# Sampling logits stay float32 (the sampler's dtype) whatever the run's dtype.
GPU_SOFTMAX = [
    SoftmaxCase("softmax_attn_h32_2k", (32, 2048, 2048), scale=1 / math.sqrt(128), causal=True),
    SoftmaxCase("softmax_sampling_b256_v128k", (256, 128256), scale=1 / 0.7, causal=False,
                dtype="float32"),
    SoftmaxCase("softmax_sampling_rowtemp_b256_v128k", (256, 128256), scale=1.0, causal=False,
                dtype="float32", row_temperature=True),
]
CPU_SOFTMAX = [
    SoftmaxCase("softmax_attn_h8_256", (8, 256, 256), scale=1 / math.sqrt(128), causal=True),
    SoftmaxCase("softmax_sampling_b4_v128k", (4, 128256), scale=1 / 0.7, causal=False,
                dtype="float32"),
    SoftmaxCase("softmax_sampling_rowtemp_b4_v128k", (4, 128256), scale=1.0, causal=False,
                dtype="float32", row_temperature=True),
]


# Llama-3-8B's decoder layer, for the fused elementwise ops.
LLAMA3_8B = dict(hidden=4096, intermediate=14336, num_heads=32, num_kv_heads=8, head_dim=128)
FUSED_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding")


@dataclass(frozen=True)
class FusedCase:
    name: str
    op: str               # one of FUSED_OPS
    num_tokens: int


GPU_FUSED = [FusedCase(f"{op}_t{t}", op, t) for op in FUSED_OPS for t in (1, 64, 4096)]
CPU_FUSED = [FusedCase(f"{op}_t{t}", op, t) for op in FUSED_OPS for t in (1, 16)]


# -- what each op must move / compute --------------------------------------------------------

def paged_attention_bytes(num_seqs: int, seq_len: int, q_len: int, num_heads: int,
                          num_kv_heads: int, head_dim: int, block_size: int,
                          elem_bytes: int) -> int:
    """Minimum bytes of one paged_attention call: every sequence's K and V rows read once
    (num_kv_heads, not expanded to the query heads), queries read and outputs written once,
    plus the block-table entries, seq_lens and query_start_loc it reads."""
    for name, v in (("num_seqs", num_seqs), ("seq_len", seq_len), ("q_len", q_len),
                    ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("block_size", block_size), ("elem_bytes", elem_bytes)):
        check_positive_int(name, v)
    if q_len > seq_len:
        raise ValueError(f"q_len ({q_len}) cannot exceed seq_len ({seq_len})")
    kv = 2 * num_seqs * seq_len * num_kv_heads * head_dim * elem_bytes
    q_and_out = 2 * num_seqs * q_len * num_heads * head_dim * elem_bytes
    blocks_per_seq = cdiv(seq_len, block_size)
    metadata = (num_seqs * blocks_per_seq + num_seqs + num_seqs + 1) * _INDEX_BYTES
    return kv + q_and_out + metadata


def paged_attention_flops(num_seqs: int, seq_len: int, q_len: int, num_heads: int,
                          head_dim: int) -> int:
    """FLOPs of QK^T and PV over the causal pairs only: query i (0-based among the
    q_len newest positions) sees seq_len - q_len + i + 1 keys; each pair is a dot product
    of head_dim multiply-adds in each of the two matmuls (2 * 2 * head_dim FLOPs)."""
    pairs = q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2
    return 4 * num_seqs * num_heads * head_dim * pairs


def softmax_bytes(numel: int, elem_bytes: int) -> int:
    """One read and one write of every element (what a fused kernel must do)."""
    return 2 * numel * elem_bytes


def row_temperatures(num_rows: int, device) -> torch.Tensor:
    """[num_rows] float32 temperatures, all different, spread over 0.3 .. 1.5."""
    return torch.linspace(0.3, 1.5, num_rows, dtype=torch.float32, device=device)


def fused_op_bytes(op: str, num_tokens: int, elem_bytes: int, hidden: int, intermediate: int,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Minimum bytes of one fused op call: every input element read once, every output
    written once (in-place outputs count as a read and a write).
      rms_norm            x in, out out [T, hidden], weight [hidden] in
      fused_add_rms_norm  x and residual in and out [T, hidden], weight in
      silu_and_mul        [T, 2I] in, [T, I] out
      rotary_embedding    q [T, H, D] and k [T, Hkv, D] in and out, cos and sin [T, D/2] in"""
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {FUSED_OPS}, got {op!r}")
    if num_tokens < 0 or elem_bytes <= 0:
        raise ValueError(f"need num_tokens >= 0 and elem_bytes > 0, got {num_tokens}, {elem_bytes}")
    if op == "rms_norm":
        elems = 2 * num_tokens * hidden + hidden
    elif op == "fused_add_rms_norm":
        elems = 4 * num_tokens * hidden + hidden
    elif op == "silu_and_mul":
        elems = 3 * num_tokens * intermediate
    else:
        elems = 2 * num_tokens * (num_heads + num_kv_heads) * head_dim + num_tokens * head_dim
    return elems * elem_bytes


# -- inputs ------------------------------------------------------------------------------------

def make_attention_inputs(case: AttentionCase, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Random paged K/V with each sequence's blocks scattered through the cache in shuffled
    order (as after a long-running server's allocations), queries for its last q_len
    positions. Block 0 is left unused (the null block)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)    # drawn on the device: GBs on a GPU
    blocks_per_seq = cdiv(case.seq_len, case.block_size)
    num_blocks = case.num_seqs * blocks_per_seq + 1
    kv_shape = (num_blocks, case.block_size, case.num_kv_heads, case.head_dim)
    k_cache = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    block_tables = perm.view(case.num_seqs, blocks_per_seq).to(device, torch.int32)
    num_tokens = case.num_seqs * case.q_len
    query = torch.randn(num_tokens, case.num_heads, case.head_dim, generator=gen, device=device,
                        dtype=dtype)
    seq_lens = torch.full((case.num_seqs,), case.seq_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(0, num_tokens + 1, case.q_len, dtype=torch.int32, device=device)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                seq_lens=seq_lens, query_start_loc=query_start_loc,
                scale=1.0 / math.sqrt(case.head_dim))


def contiguous_kv(inputs: dict, case: AttentionCase):
    """The SDPA peer's inputs: q [B, H, q_len, D] and K/V gathered into [B, H, seq_len, D]
    with the kv heads repeated for each query head of their group."""
    group = case.num_heads // case.num_kv_heads
    ks, vs = [], []
    for s in range(case.num_seqs):
        ks.append(reference.gather_kv(inputs["k_cache"], inputs["block_tables"][s], case.seq_len))
        vs.append(reference.gather_kv(inputs["v_cache"], inputs["block_tables"][s], case.seq_len))
    k = torch.stack(ks).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
    v = torch.stack(vs).repeat_interleave(group, dim=2).transpose(1, 2).contiguous()
    q = inputs["query"].view(case.num_seqs, case.q_len, case.num_heads, case.head_dim)
    return q.transpose(1, 2).contiguous(), k, v


def sdpa_mask(case: AttentionCase):
    """Causal aligned to the bottom right (queries are the newest positions)."""
    if case.q_len == 1:
        return None, False                     # one query sees everything
    if case.q_len == case.seq_len:
        return None, True
    from torch.nn.attention.bias import causal_lower_right
    return causal_lower_right(case.q_len, case.seq_len), False


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in float64."""
    got, expected = got.double(), expected.double()
    denom = expected.abs().max().item()
    return (got - expected).abs().max().item() / (denom if denom > 0 else 1.0)


def check_close(what: str, got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> float:
    err = relative_error(got, expected)
    if not err <= _REL_TOL[dtype]:
        raise AssertionError(f"{what}: output differs from the float64 reference "
                             f"(relative error {err:.3g} > {_REL_TOL[dtype]:g}); not timing a wrong kernel")
    return err


# -- benches -----------------------------------------------------------------------------------

def bench_attention(case: AttentionCase, dtype: torch.dtype, device, ceilings: dict,
                    warmup: int, iters: int) -> dict:
    device = torch.device(device)
    x = make_attention_inputs(case, dtype, device)
    out = torch.empty_like(x["query"])
    # max_query_len as the engine passes it: decode stays on the decode kernel alone.
    args = (x["query"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"],
            x["query_start_loc"], x["scale"], case.q_len)

    expected = torch.empty(out.shape, dtype=torch.float64, device=device)
    reference.paged_attention(expected, x["query"].double(), x["k_cache"].double(),
                              x["v_cache"].double(), *args[3:7])
    ops.paged_attention(out, *args)
    err = check_close(f"paged_attention {case.name}", out, expected, dtype)

    times, _ = time_op(lambda: ops.paged_attention(out, *args), device, warmup, iters)
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = paged_attention_bytes(case.num_seqs, case.seq_len, case.q_len, case.num_heads,
                                   case.num_kv_heads, case.head_dim, case.block_size, elem)
    flops = paged_attention_flops(case.num_seqs, case.seq_len, case.q_len, case.num_heads,
                                  case.head_dim)
    result = _metrics(median(times), nbytes, flops, ceilings)
    result.update(name=case.name, op="paged_attention", bound=case.bound, dtype=_name(dtype),
                  shape=dict(num_seqs=case.num_seqs, seq_len=case.seq_len, q_len=case.q_len,
                             num_heads=case.num_heads, num_kv_heads=case.num_kv_heads,
                             head_dim=case.head_dim, block_size=case.block_size),
                  rel_error=err)

    q, k, v = contiguous_kv(x, case)
    mask, is_causal = sdpa_mask(case)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=x["scale"])

    sdpa_err = relative_error(sdpa().transpose(1, 2).reshape(out.shape), expected)
    peer_times, _ = time_op(sdpa, device, warmup, iters)
    own_bytes = (2 * q.numel() + k.numel() + v.numel()) * elem     # q in, out, expanded K/V
    peer = _metrics(median(peer_times), nbytes, flops, ceilings)
    peer.update(own_bytes=own_bytes, own_bandwidth_GBps=own_bytes / median(peer_times) / 1e9,
                speedup=median(peer_times) / result["median_s"], rel_error=sdpa_err,
                matches_reference=sdpa_err <= _REL_TOL[dtype])
    result["peers"] = {"sdpa_contiguous_gqa_expanded": peer}
    if dtype in (torch.float16, torch.bfloat16) and ops.torch_paged_attention_available():
        result["peers"]["torch_varlen_paged"] = _torch_paged_peer(x, case, expected, result, ceilings,
                                                                  nbytes, flops, warmup, iters)
    return result


def _torch_paged_peer(x: dict, case: AttentionCase, expected: torch.Tensor, result: dict, ceilings: dict,
                      nbytes: int, flops: Optional[int], warmup: int, iters: int) -> dict:
    """torch's flash attention over the same paged cache (varlen_attn with block_table): the
    like-for-like peer, and the alternative prefill path (FASTLLM_PREFILL_BACKEND=torch).
    Some torch builds refuse small pages or shapes: the reason is recorded instead."""
    out = torch.empty_like(x["query"])

    def run() -> None:
        ops.torch_paged_attention(out, x["query"], x["k_cache"], x["v_cache"], x["block_tables"],
                                  x["seq_lens"], x["query_start_loc"], x["scale"], case.q_len)
    try:
        run()
        err = relative_error(out, expected)
        times, _ = time_op(run, x["query"].device, warmup, iters)
    except (RuntimeError, ValueError, TypeError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "speedup": float("nan")}
    peer = _metrics(median(times), nbytes, flops, ceilings)
    peer.update(speedup=median(times) / result["median_s"], rel_error=err,
                matches_reference=err <= _REL_TOL[x["query"].dtype])
    return peer


def bench_softmax(case: SoftmaxCase, dtype: torch.dtype, device, ceilings: dict,
                  warmup: int, iters: int) -> dict:
    device = torch.device(device)
    dtype = _DTYPES[case.dtype] if case.dtype else dtype
    gen = torch.Generator(device=device).manual_seed(1)
    # Attention scores are O(sqrt(D)) before scaling; logits O(1..10).
    spread = math.sqrt(128) if case.causal else 4.0
    scores = (torch.randn(case.shape, generator=gen, device=device) * spread).to(dtype)
    out = torch.empty_like(scores)
    offset = 0 if case.causal else None
    temps = row_scale = None
    if case.row_temperature:
        temps = row_temperatures(scores.numel() // case.shape[-1], device)
        row_scale = temps.reciprocal()

    expected = torch.empty(scores.shape, dtype=torch.float64, device=device)
    reference.fused_softmax(expected, scores.double(), case.scale, offset,
                            None if row_scale is None else row_scale.double())
    ops.fused_softmax(out, scores, case.scale, offset, row_scale)
    err = check_close(f"fused_softmax {case.name}", out, expected, dtype)

    times, _ = time_op(lambda: ops.fused_softmax(out, scores, case.scale, offset, row_scale),
                       device, warmup, iters)
    nbytes = softmax_bytes(scores.numel(), scores.element_size())
    result = _metrics(median(times), nbytes, None, ceilings)
    result.update(name=case.name, op="fused_softmax", bound="bandwidth", dtype=_name(dtype),
                  shape=dict(shape=list(case.shape), scale=case.scale, causal=case.causal,
                             row_temperature=case.row_temperature),
                  rel_error=err)

    peers = {"torch_softmax": lambda: torch.softmax(scores, dim=-1)}
    if case.row_temperature:
        peers["torch_div_softmax"] = lambda: torch.softmax(scores / temps[:, None], dim=-1)
    elif case.causal:
        rows, cols = case.shape[-2], case.shape[-1]
        mask = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_(1)   # c > r

        def three_ops():
            return (scores * case.scale).masked_fill(mask, float("-inf")).softmax(dim=-1)
        peers["torch_scale_mask_softmax"] = three_ops
    else:
        peers["torch_scale_softmax"] = lambda: torch.softmax(scores * case.scale, dim=-1)
    result["peers"] = {}
    for name, fn in peers.items():
        peer_times, peer_out = time_op(fn, device, warmup, iters)
        peer = _metrics(median(peer_times), nbytes, None, ceilings)
        peer["speedup"] = median(peer_times) / result["median_s"]
        if name != "torch_softmax":          # softmax alone computes something else
            peer["rel_error"] = relative_error(peer_out, expected)
            peer["matches_reference"] = peer["rel_error"] <= _REL_TOL[dtype]
        result["peers"][name] = peer
    return result


def _torch_rotate(x, cos, sin):
    """layers.py's former _rotate: 7 torch ops (chunk, 4 multiplies, sub, add, cat)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_fused_inputs(case: FusedCase, dtype: torch.dtype, device, shape: dict = LLAMA3_8B,
                      seed: int = 0) -> dict:
    """Random inputs of one fused op, laid out as the decoder layer has them (q and k are
    views of a fused [T, q | k | v] projection output)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    t, h, inter = case.num_tokens, shape["hidden"], shape["intermediate"]
    heads, kv_heads, d = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    if case.op in ("rms_norm", "fused_add_rms_norm"):
        return dict(x=rnd(t, h, scale=3.0), residual=rnd(t, h), weight=rnd(h))
    if case.op == "silu_and_mul":
        return dict(x=rnd(t, 2 * inter, scale=3.0))
    qkv = rnd(t, (heads + 2 * kv_heads) * d)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    positions = torch.randint(0, 8192, (t,), generator=gen, device=device).float()
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    angles = torch.outer(positions, inv_freq)
    return dict(query=q.view(t, heads, d), key=k.view(t, kv_heads, d),
                cos=angles.cos().to(dtype), sin=angles.sin().to(dtype))


def fused_reference(case: FusedCase, x: dict) -> dict:
    """The op's outputs in float64 (fastllm.reference on float64 copies of the inputs)."""
    d = {k: v.double() for k, v in x.items()}
    if case.op == "rms_norm":
        out = torch.empty_like(d["x"])
        reference.rms_norm(out, d["x"], d["weight"], 1e-5)
        return {"out": out}
    if case.op == "fused_add_rms_norm":
        reference.fused_add_rms_norm(d["x"], d["residual"], d["weight"], 1e-5)
        return {"x": d["x"], "residual": d["residual"]}
    if case.op == "silu_and_mul":
        out = d["x"].new_empty(d["x"].shape[0], d["x"].shape[1] // 2)
        reference.silu_and_mul(out, d["x"])
        return {"out": out}
    q, k = d["query"].clone(), d["key"].clone()
    reference.rotary_embedding(q, k, d["cos"], d["sin"])
    return {"query": q, "key": k}


def fused_callables(case: FusedCase, x: dict):
    """(fastllm op, the torch chain it replaced): each returns its outputs as a dict of
    tensors. The in-place ops are timed on their own inputs: repeated residual adds and
    rotations keep values finite (norms and rotations preserve scale)."""
    eps = 1e-5
    if case.op == "rms_norm":
        out = torch.empty_like(x["x"])

        def fused():
            ops.rms_norm(out, x["x"], x["weight"], eps)
            return {"out": out}

        def chain():   # RMSNorm before: x.float(), rms_norm, .to(dtype), weight * (4 kernels)
            normed = torch.nn.functional.rms_norm(x["x"].float(), (x["x"].shape[-1],), eps=eps)
            return {"out": x["weight"] * normed.to(x["x"].dtype)}
    elif case.op == "fused_add_rms_norm":
        def fused():
            ops.fused_add_rms_norm(x["x"], x["residual"], x["weight"], eps)
            return {"x": x["x"], "residual": x["residual"]}

        def chain():   # the residual add, then the 4-kernel RMSNorm
            residual = x["residual"] + x["x"]
            normed = torch.nn.functional.rms_norm(residual.float(), (residual.shape[-1],), eps=eps)
            return {"x": x["weight"] * normed.to(residual.dtype), "residual": residual}
    elif case.op == "silu_and_mul":
        out = x["x"].new_empty(x["x"].shape[0], x["x"].shape[1] // 2)

        def fused():
            ops.silu_and_mul(out, x["x"])
            return {"out": out}

        def chain():
            gate, up = x["x"].chunk(2, dim=-1)
            return {"out": torch.nn.functional.silu(gate) * up}
    else:
        cos, sin = x["cos"].unsqueeze(1), x["sin"].unsqueeze(1)

        def fused():
            ops.rotary_embedding(x["query"], x["key"], x["cos"], x["sin"])
            return {"query": x["query"], "key": x["key"]}

        def chain():
            return {"query": _torch_rotate(x["query"], cos, sin), "key": _torch_rotate(x["key"], cos, sin)}
    return fused, chain


def bench_fused(case: FusedCase, dtype: torch.dtype, device, ceilings: dict, warmup: int,
                iters: int, shape: dict = LLAMA3_8B) -> dict:
    """One fused op vs its torch chain; both checked against the float64 reference first
    (the chain on fresh inputs, then the op on the same inputs, since it works in place)."""
    device = torch.device(device)
    x = make_fused_inputs(case, dtype, device, shape)
    expected = fused_reference(case, x)
    fused, chain = fused_callables(case, x)
    chain_out = chain()
    peer_err = max(relative_error(chain_out[k], expected[k]) for k in expected)
    got = fused()
    err = max(check_close(f"{case.op} {case.name} ({k})", got[k], expected[k], dtype) for k in expected)

    times, _ = time_op(fused, device, warmup, iters)
    nbytes = fused_op_bytes(case.op, case.num_tokens, torch.tensor([], dtype=dtype).element_size(),
                            **shape)
    result = _metrics(median(times), nbytes, None, ceilings)
    result.update(name=case.name, op=case.op, bound="bandwidth", dtype=_name(dtype),
                  shape=dict(num_tokens=case.num_tokens, **shape), rel_error=err)
    peer_times, _ = time_op(chain, device, warmup, iters)
    peer = _metrics(median(peer_times), nbytes, None, ceilings)
    peer.update(speedup=median(peer_times) / result["median_s"], rel_error=peer_err,
                matches_reference=peer_err <= _REL_TOL[dtype])
    result["peers"] = {"torch_chain": peer}
    return result


def _metrics(t: float, nbytes: int, flops: Optional[int], ceilings: dict) -> dict:
    bw = nbytes / t / 1e9
    m = {"median_s": t, "bytes": nbytes, "bandwidth_GBps": bw,
         "bw_vs_copy": bw / ceilings["copy_GBps"]}
    if flops is not None:
        tflops = flops / t / 1e12
        m.update(flops=flops, tflops=tflops, tflops_vs_gemm=tflops / ceilings["gemm_TFLOPs"])
    return m


def measure_ceilings(device, dtype: torch.dtype, small: bool, warmup: int, iters: int) -> dict:
    """Copy bandwidth and GEMM TFLOP/s of this device, measured now."""
    copy = bench_copy((16 << 20) if small else (1 << 30), device, warmup, iters)
    n = 512 if small else 8192
    gemm = bench_gemm(n, n, n, dtype, device, warmup, iters)
    if not (copy["check_ok"] and gemm["check_ok"]):
        raise AssertionError(f"ceiling measurement produced a wrong result: copy {copy['check_ok']}, "
                             f"gemm {gemm['check_ok']}")
    return {"copy_GBps": copy["value"], "copy_bytes": copy["bytes"],
            "gemm_TFLOPs": gemm["value"], "gemm_shape": [n, n, n], "gemm_dtype": _name(dtype)}


def run_kernels(device="auto", dtype: str = "auto", small: Optional[bool] = None,
                warmup: Optional[int] = None, iters: Optional[int] = None,
                only: Optional[list] = None) -> dict:
    from fastllm.model.loader import resolve_device
    device = resolve_device(device)
    on_gpu = device.type == "cuda"
    small = (not on_gpu) if small is None else small
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose from {', '.join(sorted(_DTYPES))} or auto")
    torch_dtype = _DTYPES[dtype]
    warmup = (5 if on_gpu else 1) if warmup is None else warmup
    iters = (20 if on_gpu else 3) if iters is None else iters
    attention = CPU_ATTENTION if small else GPU_ATTENTION
    softmax = CPU_SOFTMAX if small else GPU_SOFTMAX
    fused = CPU_FUSED if small else GPU_FUSED
    names = [c.name for c in attention + softmax + fused]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only: unknown case(s) {unknown}; cases: {', '.join(names)}")
        attention = [c for c in attention if c.name in only]
        softmax = [c for c in softmax if c.name in only]
        fused = [c for c in fused if c.name in only]

    ceilings = measure_ceilings(device, torch_dtype, small, warmup, iters)
    results = []
    with torch.no_grad():
        for case in attention:
            results.append(bench_attention(case, torch_dtype, device, ceilings, warmup, iters))
            _release(device)
        for case in softmax:
            results.append(bench_softmax(case, torch_dtype, device, ceilings, warmup, iters))
            _release(device)
        fused_results = []
        for case in fused:
            fused_results.append(bench_fused(case, torch_dtype, device, ceilings, warmup, iters))
            _release(device)
    return {"bench": "kernels", "device": _device_name(device), "torch": torch.__version__,
            "native": ops.native_available(), "cuda_kernels": ops.cuda_available(),
            "cuda_ops": list(ops.build_info().get("cuda_ops", [])), "small": small,
            "dtype": dtype, "warmup": warmup, "iters": iters,
            "ceilings": ceilings, "kernels": results, "fused": fused_results}


def format_results(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"device {result['device']}  dtype {result['dtype']}  native {result['native']}  "
             f"cuda kernels {result['cuda_kernels']}",
             f"ceilings: copy {c['copy_GBps']:.1f} GB/s, GEMM {c['gemm_TFLOPs']:.2f} TFLOP/s",
             f"{'case':<28} {'time':>10} {'GB/s':>9} {'vs copy':>8} {'TFLOP/s':>8}  peers (speedup)"]
    for k in result["kernels"]:
        tf = f"{k['tflops']:.2f}" if "tflops" in k else "-"
        peers = ", ".join(f"{n} {p['speedup']:.2f}x" for n, p in k["peers"].items())
        lines.append(f"{k['name']:<28} {k['median_s'] * 1e6:>8.1f}us {k['bandwidth_GBps']:>9.1f} "
                     f"{k['bw_vs_copy']:>7.1%} {tf:>8}  {peers}")
    if result.get("fused"):
        lines.append(f"{'fused op (vs torch chain)':<28} {'time':>10} {'GB/s':>9} {'vs copy':>8} "
                     f"{'chain us':>9} {'speedup':>8}")
        for k in result["fused"]:
            chain = k["peers"]["torch_chain"]
            lines.append(f"{k['name']:<28} {k['median_s'] * 1e6:>8.1f}us {k['bandwidth_GBps']:>9.1f} "
                         f"{k['bw_vs_copy']:>7.1%} {chain['median_s'] * 1e6:>9.1f} {chain['speedup']:>7.2f}x")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), "
                        "float16, bfloat16 or float32 (sampling logits stay float32)")
    parser.add_argument("--small", action="store_true", default=None,
                        help="tiny shapes (automatic on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (5 GPU, 1 CPU)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls; median reported (20 GPU, 3 CPU)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer timed calls ({QUICK_WARMUP} warm-up, median of {QUICK_ITERS}; "
                             "--warmup/--iters still win): every case in well under a minute")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")


# --quick (scripts/gpu_check.sh): on a GPU each case is the median of QUICK_ITERS CUDA-event
# timings after QUICK_WARMUP calls (the cost of a case there is its inputs and float64
# check, not its timed calls). On a CPU one untimed-warm-up-free call: the dry run checks
# the plumbing, not the speed.
QUICK_WARMUP, QUICK_ITERS = 2, 10
QUICK_CPU_WARMUP, QUICK_CPU_ITERS = 0, 1


def run(args: argparse.Namespace) -> dict:
    only = [s for s in args.only.split(",") if s] if args.only else None
    warmup, iters = args.warmup, args.iters
    if args.quick:
        from fastllm.model.loader import resolve_device
        on_cpu = resolve_device(args.device).type == "cpu"
        warmup = warmup if warmup is not None else (QUICK_CPU_WARMUP if on_cpu else QUICK_WARMUP)
        iters = iters if iters is not None else (QUICK_CPU_ITERS if on_cpu else QUICK_ITERS)
    result = run_kernels(args.device, args.dtype, args.small, warmup, iters, only)
    result["quick"] = bool(args.quick)
    print(format_results(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
