"""The CPU fp32 paged attention's prefill path (several query tokens per work item, key
tiles transposed for a register-blocked Q K^T) against the float64 reference, on both
kernel builds: mixed decode / prompt / prefix-continuing steps, GQA ratios, head dims on
and off the tiled path (D % 8), block sizes that split key tiles, query views of the
fused qkv output, and caches poisoned outside each sequence's keys."""
import pytest
import torch

from fastllm import ops, reference
from tests.ops.test_ops import make_paged_batch, rel_err

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

STEPS = {
    "prompt": ([512], [512]),                                       # the bench's prefill
    "mixed": ([1, 200, 370, 2, 9, 33], [1, 200, 70, 2, 1, 17]),     # decodes, a prompt, prefix hits
    "short": ([3, 2], [3, 2]),                                      # fewer tokens than one block
    "odd": ([101, 47], [29, 47]),                                    # 8-token blocks end mid-tile
}


def _reference(q, kc, vc, bt, sl, qsl, scale):
    ref = torch.empty(q.shape, dtype=torch.float64)
    reference.paged_attention(ref, q.double(), kc.double(), vc.double(), bt, sl, qsl, scale)
    return ref


def _poison_unowned(kc, vc, bt, seq_lens):
    """NaN in every cache slot that is not one of a sequence's first seq_len positions."""
    block_size = kc.shape[1]
    owned = torch.zeros(kc.shape[0] * block_size, dtype=torch.bool)
    for s, n in enumerate(seq_lens):
        pos = torch.arange(n)
        owned[bt[s].long()[pos // block_size] * block_size + pos % block_size] = True
    for cache in (kc, vc):
        cache.view(-1, *cache.shape[2:])[~owned] = float("nan")


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("group,num_kv_heads", [(1, 2), (3, 3), (4, 2), (8, 1)])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 5), (40, 16), (36, 7)])
def test_prefill_attention_matches_float64(step, group, num_kv_heads, head_dim, block_size, isa):
    seq_lens, q_lens = STEPS[step]
    if step == "prompt" and (head_dim != 64 or group not in (3, 8)):
        pytest.skip("the long prompt runs on the model's shapes only (its reference is slow)")
    q, kc, vc, bt, sl, qsl = make_paged_batch(seq_lens, q_lens, num_kv_heads * group, num_kv_heads,
                                              head_dim, block_size, torch.float32, "cpu", seed=head_dim + group)
    _poison_unowned(kc, vc, bt, seq_lens)
    scale = head_dim ** -0.5
    ref = _reference(q, kc.nan_to_num(), vc.nan_to_num(), bt, sl, qsl, scale)
    out = torch.full_like(q, float("nan"))
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, scale, max_query_len=max(q_lens))
    assert not out.isnan().any()
    # every row on its own: no token or head left unwritten or given another's keys
    row_err = (out.double() - ref).abs().amax(dim=2) / ref.abs().amax(dim=2).clamp_min(1e-6)
    assert row_err.max().item() < 1e-4
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("head_dim", [64, 40])
def test_prefill_attention_reads_query_views_of_the_qkv_output(head_dim, isa):
    # The model's q is a view into [T, (H + 2 Hkv) * D] (token stride > H * D), no copy.
    H, Hkv = 9, 3
    q, kc, vc, bt, sl, qsl = make_paged_batch([60, 1, 25], [60, 1, 9], H, Hkv, head_dim, 16, torch.float32,
                                              "cpu", seed=3)
    qkv = torch.randn(q.shape[0], (H + 2 * Hkv) * head_dim)
    qkv[:, :H * head_dim] = q.flatten(1)
    view = qkv[:, :H * head_dim].view(-1, H, head_dim)
    assert not view.is_contiguous()
    out = torch.empty_like(q)
    ops.paged_attention(out, view, kc, vc, bt, sl, qsl, 0.125, max_query_len=60)
    assert rel_err(out, _reference(q, kc, vc, bt, sl, qsl, 0.125)) < 1e-5


def test_prefill_attention_softmax_is_stable_for_large_scores(isa):
    # Scores in the hundreds: the online max must be subtracted before every exp (a naive
    # exp overflows to inf, a late max shift loses the early keys' mass).
    q, kc, vc, bt, sl, qsl = make_paged_batch([150, 40], [150, 24], 8, 2, 64, 16, torch.float32, "cpu", seed=5)
    q, kc = q * 6, kc * 6
    out = torch.empty_like(q)
    ops.paged_attention(out, q, kc, vc, bt, sl, qsl, 1.0, max_query_len=150)
    assert out.isfinite().all()
    assert rel_err(out, _reference(q, kc, vc, bt, sl, qsl, 1.0)) < 1e-5
