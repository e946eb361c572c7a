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
"""
from __future__ import annotations

import torch


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
    num_blocks = (seq_len + block_size - 1) // block_size
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


def fused_softmax(out, scores, scale: float = 1.0, causal_offset: int | None = None) -> None:
    """softmax(scale * scores) over the last dim; with causal_offset, row r (second to
    last dim) keeps columns c <= r + causal_offset. A fully masked row becomes zeros."""
    acc = torch.promote_types(scores.dtype, torch.float32)
    x = scores.to(acc) * scale
    if causal_offset is not None:
        rows, cols = x.shape[-2], x.shape[-1]
        cols_idx = torch.arange(cols, device=x.device).unsqueeze(0)
        mask = cols_idx > (torch.arange(rows, device=x.device).unsqueeze(1) + causal_offset)
        x = x.masked_fill(mask, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    denom = e.sum(dim=-1, keepdim=True)
    out.copy_(torch.where(denom > 0, e / denom.clamp_min(torch.finfo(acc).tiny), torch.zeros_like(e)).to(out.dtype))
