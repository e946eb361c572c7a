"""Edge cases of the CPU fast paths (AVX2 + FMA where the CPU has them): the vectorized
exp in silu_and_mul and in paged attention's online softmax, against float64. Each test
runs on both builds (ops.quant_cpu_force_generic switches every CPU kernel)."""
import pytest
import torch

from fastllm import ops, reference

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")


def test_silu_and_mul_extreme_gates_match_float64(isa):
    # exp's range reduction and its flush below -87, both signs, and a ragged tail (I = 21).
    gate = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 3.0, -3.0, 20.0, -20.0, 86.0, -86.0, 87.5, -87.5,
                         88.5, -88.5, 100.0, -100.0, 1e4, -1e4, 7.25])
    up = torch.linspace(-2.0, 2.0, gate.numel())
    x = torch.cat((gate, up)).unsqueeze(0)                         # [1, 2I]
    out = torch.empty(1, gate.numel())
    ops.silu_and_mul(out, x)
    g, u = gate.double(), up.double()
    want = g * torch.sigmoid(g) * u
    torch.testing.assert_close(out[0].double(), want, rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("score_scale", [1.0, 40.0])
@pytest.mark.parametrize("head_dim", [64, 80, 40])
def test_paged_attention_peaked_scores_match_float64(score_scale, head_dim, isa):
    # Large scores make most exp(s - max) underflow (the flush path); head_dim 80 and 40
    # leave 16- and 8-wide tails after the 32-wide vector loop. GQA group 3, 75 keys
    # (three tiles, the last partial), a prefill of 75 and a decode of 1 in one step.
    torch.manual_seed(0)
    num_heads, num_kv, block_size = 6, 2, 16
    seq_lens, q_lens = [75, 40], [75, 1]
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_heads, head_dim) * score_scale
    k_cache = torch.randn(12, block_size, num_kv, head_dim)
    v_cache = torch.randn(12, block_size, num_kv, head_dim)
    block_tables = torch.tensor([[3, 1, 7, 5, 9], [2, 0, 11, 0, 0]], dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.tensor([0, q_lens[0], num_tokens], dtype=torch.int32)
    out = torch.empty_like(query)
    ops.paged_attention(out, query, k_cache, v_cache, block_tables, seq_lens_t, qsl, head_dim ** -0.5, max(q_lens))
    want = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float64)
    reference.paged_attention(want, query.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens_t,
                              qsl, head_dim ** -0.5)
    # fp32 rounding of a score grows with its size, and exp turns it into relative error.
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5 * score_scale)
