"""Pure-torch references for every native kernel.

They are the test oracle (run them in float64) and the fallback `ops.py` uses when the
extension is absent or was built without the device's kernels. Shapes follow DESIGN §3:

  key/value            [num_tokens, num_kv_heads, head_dim]
  k_cache/v_cache      [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping         [num_tokens] int64, slot = block_id * block_size + offset, -1 = skip
  query/out            [num_tokens, num_heads, head_dim] (flattened across sequences)
  block_tables         [num_seqs, max_blocks_per_seq] int32
  seq_lens             [num_seqs] int32, tokens in the cache after this step's writes
  query_start_loc      [num_seqs + 1] int32, cumulative query counts (seeds/001)

The fused decoder-layer ops (rms_norm, fused_add_rms_norm, silu_and_mul,
rotary_embedding) have CUDA kernels only: on CPU these references *are* the
implementation. They are the torch ops the model ran before the fused kernels (so CPU
output is unchanged bit for bit), with HF's Llama layers' rounding points in the model
dtype, which are the contract the CUDA kernels follow. Accumulation is float32, or
float64 for float64 input.
"""
from __future__ import annotations

import collections
import math

import torch

from fastllm.utils import cdiv


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[valid].to(v_cache.dtype)


def gather_kv(cache, block_table, seq_len: int):
    """[seq_len, num_kv_heads, head_dim] rows of one sequence, in position order."""
    block_size = cache.shape[1]
    num_blocks = cdiv(seq_len, block_size)
    rows = cache[block_table[:num_blocks].long()].flatten(0, 1)
    return rows[:seq_len]


def paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens,
                    query_start_loc, scale: float) -> None:
    """Causal attention of each sequence's queries (the last q_len positions of its
    seq_len tokens) against the K/V its block table points at. Computes in the
    query's dtype promoted to at least float32."""
    num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    acc = torch.promote_types(query.dtype, torch.float32)
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[s], qsl[s + 1]
        if q1 == q0:
            continue
        q = query[q0:q1].to(acc)                                   # [q_len, H, D]
        k = gather_kv(k_cache, block_tables[s], seq_len).to(acc)   # [seq_len, Hkv, D]
        v = gather_kv(v_cache, block_tables[s], seq_len).to(acc)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale        # [H, q_len, seq_len]
        q_pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=query.device).unsqueeze(0) > q_pos
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)


def rms_norm(out, x, weight, eps: float) -> None:
    """out [T, hidden] = weight * dtype(x * rsqrt(mean(x^2) + eps)): normalised in float32,
    scaled in the dtype of x (HF's LlamaRMSNorm). weight [hidden] in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    normed = torch.nn.functional.rms_norm(x.to(acc), (x.shape[-1],), eps=eps)
    out.copy_(weight * normed.to(x.dtype))


def fused_add_rms_norm(x, residual, weight, eps: float) -> None:
    """In place: residual = residual + x (in the model dtype, as HF adds the residual),
    then x = rms_norm(residual)."""
    residual.add_(x)
    rms_norm(x, residual, weight, eps)


def silu_and_mul(out, x) -> None:
    """x [T, 2I] = [gate | up] -> out [T, I] = silu(gate) * up, each op rounded to the
    dtype (HF's act_fn(gate_proj(x)) * up_proj(x))."""
    gate, up = x.chunk(2, dim=-1)
    out.copy_(torch.nn.functional.silu(gate) * up)


def rotary_embedding(query, key, cos, sin) -> None:
    """Neox (rotate-half) RoPE in place: query [T, H, D], key [T, Hkv, D] (may be views of
    the fused qkv output); cos, sin [T, D/2] in their dtype. Each product, difference and
    sum rounds to the dtype, as HF's q * cos + rotate_half(q) * sin does."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)       # [T, 1, D/2]: broadcast over heads
    for x in (query, key):
        x1, x2 = x.chunk(2, dim=-1)
        rotated1 = x1 * cos - x2 * sin
        rotated2 = x2 * cos + x1 * sin
        x1.copy_(rotated1)
        x2.copy_(rotated2)


def fused_softmax(out, scores, scale: float = 1.0, causal_offset: int | None = None,
                  row_scale: torch.Tensor | None = None) -> None:
    """softmax(scale * row_scale[r] * scores) over the last dim; row_scale is [num_rows]
    over the rows of scores viewed as [-1, last dim] (None: 1). With causal_offset, row r
    (second to last dim) keeps columns c <= r + causal_offset. A fully masked row becomes
    zeros."""
    acc = torch.promote_types(scores.dtype, torch.float32)
    x = scores.to(acc) * scale
    if row_scale is not None:
        num_rows = math.prod(scores.shape[:-1])
        if row_scale.dim() != 1 or row_scale.numel() != num_rows:
            raise ValueError(f"row_scale: expected shape [{num_rows}] (one per row of scores "
                             f"{tuple(scores.shape)}), got {tuple(row_scale.shape)}")
        x = x * row_scale.to(acc).view(*scores.shape[:-1], 1)
    if causal_offset is not None:
        rows, cols = x.shape[-2], x.shape[-1]
        cols_idx = torch.arange(cols, device=x.device).unsqueeze(0)
        mask = cols_idx > (torch.arange(rows, device=x.device).unsqueeze(1) + causal_offset)
        x = x.masked_fill(mask, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    denom = e.sum(dim=-1, keepdim=True)
    out.copy_(torch.where(denom > 0, e / denom.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(e)).to(out.dtype))


class BlockAllocator:
    """Pure-Python twin of the C++ BlockAllocator (cpp/include/fastllm/block_allocator.h),
    same contract and same block ids: the oracle of its tests and the fallback without
    fastllm._C. Never-cached free blocks (a stack) go before freed cached blocks, which
    are evicted least recently freed first."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._ref = [0] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}
        self.hits = self.queries = self.evictions = 0

    def _check(self, block_id: int, op: str) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"{op}: unknown block id {block_id} (pool has {self.num_blocks} blocks)")

    def allocate(self) -> int:
        if self._free:
            block_id = self._free.pop()
        elif self._lru:
            block_id, _ = self._lru.popitem(last=False)
            del self._hash_to_block[self._block_to_hash.pop(block_id)]
            self.evictions += 1
        else:
            raise RuntimeError(f"BlockAllocator: out of KV blocks (all {self.num_blocks} are in use)")
        self._ref[block_id] = 1
        return block_id

    def free(self, block_id: int) -> None:
        self._check(block_id, "free")
        if self._ref[block_id] == 0:
            raise ValueError(f"free: block {block_id} is already free (double free)")
        self._ref[block_id] -= 1
        if self._ref[block_id] == 0:
            if block_id in self._block_to_hash:
                self._lru[block_id] = None
            else:
                self._free.append(block_id)

    def share(self, block_id: int) -> None:
        self._check(block_id, "share")
        if self._ref[block_id] == 0:
            raise ValueError(f"share: block {block_id} is free")
        self._ref[block_id] += 1

    def lookup(self, block_hash: int) -> int:
        self.queries += 1
        block_id = self._hash_to_block.get(block_hash, -1)
        if block_id >= 0:
            if self._ref[block_id] == 0:
                del self._lru[block_id]
            self._ref[block_id] += 1
            self.hits += 1
        return block_id

    def register(self, block_id: int, block_hash: int) -> bool:
        self._check(block_id, "register")
        if self._ref[block_id] == 0:
            raise ValueError(f"register: block {block_id} is free")
        if block_id in self._block_to_hash:
            if self._block_to_hash[block_id] == block_hash:
                return True
            raise ValueError(f"register: block {block_id} already holds another hash")
        if block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    def ref_count(self, block_id: int) -> int:
        self._check(block_id, "ref_count")
        return self._ref[block_id]

    def block_hash(self, block_id: int):
        self._check(block_id, "block_hash")
        return self._block_to_hash.get(block_id)

    def reset_prefix_cache(self) -> None:
        self._free.extend(self._lru)
        self._lru.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._hash_to_block)


# -- GGUF block formats (quant_linear) -----------------------------------------------------
# ggml type id -> (weights per block, bytes per block), for the types the kernels handle.
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               12: (256, 144), 13: (256, 176), 14: (256, 210)}


def _half(blocks, offset: int):
    """[num_blocks, 1] float64 of the fp16 at byte `offset` of each block."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).to(torch.float64)


def _k_scales_mins(s):
    """s [nb, 12] uint8 -> (scales, mins) [nb, 8] int64: Q4_K/Q5_K's packed 6-bit values."""
    s = s.long()
    low_sc, low_mn = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    high_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([low_sc, high_sc], 1), torch.cat([low_mn, high_mn], 1)


def _dequant_blocks(b, ggml_type: int):
    """b [nb, block_bytes] uint8 -> [nb, block_elems] float64 (ggml-common.h layouts)."""
    nb = b.shape[0]
    if ggml_type in (2, 3):                       # Q4_0: d, qs[16]; Q4_1: d, m, qs[16]
        qs = b[:, 2:18] if ggml_type == 2 else b[:, 4:20]
        q = torch.cat([qs & 15, qs >> 4], 1).to(torch.float64)
        return _half(b, 0) * (q - 8) if ggml_type == 2 else _half(b, 0) * q + _half(b, 2)
    if ggml_type in (6, 7):                       # Q5_0: d, qh[4], qs[16]; Q5_1: d, m, qh[4], qs[16]
        qh_at, qs_at = (2, 6) if ggml_type == 6 else (4, 8)
        qs = b[:, qs_at:qs_at + 16].long()
        qh = b[:, qh_at:qh_at + 4].long()
        qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)       # [nb]
        fifth = (qh.unsqueeze(1) >> torch.arange(32)) & 1                             # [nb, 32]
        q = (torch.cat([qs & 15, qs >> 4], 1) | (fifth << 4)).to(torch.float64)
        return _half(b, 0) * (q - 16) if ggml_type == 6 else _half(b, 0) * q + _half(b, 2)
    if ggml_type == 8:                            # Q8_0: d, int8 qs[32]
        return _half(b, 0) * b[:, 2:34].contiguous().view(torch.int8).to(torch.float64)
    if ggml_type in (12, 13):                     # Q4_K / Q5_K: d, dmin, scales[12], (qh[32]), qs[128]
        scales, mins = _k_scales_mins(b[:, 4:16])
        qs = b[:, 16:144] if ggml_type == 12 else b[:, 48:176]
        qs = qs.long().reshape(nb, 4, 1, 32)
        q = torch.cat([qs & 15, qs >> 4], 2).reshape(nb, 8, 32)    # sub-block 2g: low nibbles
        if ggml_type == 13:
            qh = b[:, 16:48].long().unsqueeze(1)                     # [nb, 1, 32]
            q = q + 16 * ((qh >> torch.arange(8).view(1, 8, 1)) & 1)
        values = _half(b, 0).unsqueeze(2) * scales.unsqueeze(2) * q - _half(b, 2).unsqueeze(2) * mins.unsqueeze(2)
        return values.reshape(nb, 256)
    if ggml_type == 14:                           # Q6_K: ql[128], qh[64], int8 scales[16], d
        ql = b[:, :128].long().reshape(nb, 2, 2, 32)                 # [half, lo/hi 32, l]
        qh = b[:, 128:192].long().reshape(nb, 2, 1, 32)
        low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
        high = (qh >> (2 * torch.arange(4).view(1, 1, 4, 1))) & 3     # [nb, 2, 4, 32]
        q = (low | (high << 4)) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).long().reshape(nb, 2, 4, 2, 1)
        values = q.reshape(nb, 2, 4, 2, 16) * sc * _half(b, 208).view(nb, 1, 1, 1, 1)
        return values.reshape(nb, 256)
    raise ValueError(f"ggml_type {ggml_type} has no reference dequantization")


def quant_dequantize(weight, ggml_type: int, in_features: int):
    """weight uint8 [N, row_bytes] of ggml blocks -> [N, in_features] float64."""
    block_elems, block_bytes = GGML_BLOCKS[ggml_type]
    rows = weight.shape[0]
    if ggml_type in (0, 1, 30):
        dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[ggml_type]
        return weight.contiguous().view(dtype).reshape(rows, in_features).to(torch.float64)
    blocks = weight.reshape(rows * (in_features // block_elems), block_bytes)
    return _dequant_blocks(blocks, ggml_type).reshape(rows, in_features)


def quant_linear(out, x, weight, ggml_type: int, bias=None) -> None:
    """out [T, N] = x [T, K] @ dequant(weight [N, row_bytes])^T (+ bias), in float64."""
    w = quant_dequantize(weight.cpu(), ggml_type, x.shape[1]).to(x.device)
    y = x.to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    out.copy_(y)


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] (K a multiple of 32) rounded as the CPU int8-activation GEMV (and ggml's
    quantize_row_q8_0 / q8_1) rounds it: per 32 values q = round-half-even(x * (127 /
    max|x|)) in float32 and the scale d = max|x| / 127 stored as fp16. Returns q * d in
    float64: what the kernel's exact int32 sums multiply. (The _1 types also use s =
    fp16(d * sum(q)) for the block minimum: see test_quant_linear.)"""
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    d = (amax / torch.tensor(127.0)).to(torch.float16)
    return (q.to(torch.float64) * d.to(torch.float64)).reshape(x.shape)


def quantize_activations_q8k(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] (K a multiple of 256) rounded as the CPU int8 GEMV of the K-quants (and
    ggml's quantize_row_q8_K_ref) rounds it: per 256 values the one of largest |x| (the
    first, on ties) maps to -127, q = min(127, round-half-even(x * -127 / max)) in float32,
    d = 1 / (-127 / max). Returns q * d in float64."""
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], -1, 256)
    idx = blocks.abs().argmax(dim=-1, keepdim=True)   # argmax returns the first maximum
    peak = blocks.gather(-1, idx)
    iscale = torch.where(peak != 0, torch.tensor(-127.0) / peak, torch.zeros_like(peak))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(peak != 0, 1.0 / iscale, torch.zeros_like(peak))
    return (q.to(torch.float64) * d.to(torch.float64)).reshape(x.shape)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where bit t % 32 of bitmask[i, t // 32] is 0.
    logits [S, V] float; bitmask [R, W] int32 (W >= ceil(V / 32); tokens past W * 32 are
    masked); rows [R] int64, distinct rows of logits."""
    num_rows, vocab_size = bitmask.shape[0], logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1          # [R, W, 32]
    allowed = bits.view(num_rows, -1).bool()[:, :vocab_size]              # [R, min(V, W*32)]
    if allowed.shape[1] < vocab_size:
        pad = torch.zeros(num_rows, vocab_size - allowed.shape[1], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([allowed, pad], dim=1)
    rows = rows.to(device=logits.device, dtype=torch.int64)
    masked = logits.index_select(0, rows).masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, rows, masked)
