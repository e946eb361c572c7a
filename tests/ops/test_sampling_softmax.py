"""fused_softmax with a per-row scale (row_scale: the sampler's per-row 1 / temperature)
against the float64 reference and against torch.softmax(logits / t[:, None]).

Vocabulary-sized rows take the CUDA block-per-row kernel, short rows (<= 1024 columns)
the warp-per-row kernel; the CPU kernel is one path for both."""
import pytest
import torch

from fastllm import ops, reference
from fastllm.model.sampler import Sampler, SamplingBatch
from fastllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastllm._C is not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
EPS32 = 2.0 ** -23


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def scaled_tolerance(dtype, scores, scale, row_scale):
    """The kernels form scale * row_scale[r] * x in float32: an error of a few ulps of the
    largest scaled score, which exp turns into that much relative error per probability
    (a 1e-3 temperature scales logits of ~10 to ~1e4, whose ulp is ~1e-3)."""
    largest = (scores.double().abs().amax(dim=-1) * abs(scale) * row_scale.double().abs()).max().item()
    return TOL[dtype] + 4 * EPS32 * largest


def logits(shape, seed, spread=4.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * spread


# Temperatures from near-greedy to near-uniform, every row different.
TEMPERATURES = [1e-3, 0.05, 0.7, 1.0, 1.3, 100.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [128256, 32000, 1024, 999, 33, 1])
def test_row_scale_matches_float64(device, dtype, cols):
    rows = len(TEMPERATURES)
    scores = logits((rows, cols), seed=cols).to(dtype).to(device)
    temps = torch.tensor(TEMPERATURES, dtype=torch.float32)
    row_scale = (1.0 / temps).to(device)
    scale = 0.9
    out = torch.empty_like(scores)
    ops.fused_softmax(out, scores, scale, row_scale=row_scale)
    ref = torch.empty(rows, cols, dtype=torch.float64)
    reference.fused_softmax(ref, scores.double().cpu(), scale, None, row_scale.double().cpu())
    out = out.cpu()
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < scaled_tolerance(dtype, scores.cpu(), scale, row_scale.cpu())
    # Every row is a distribution (up to float32 sums over 128k columns).
    torch.testing.assert_close(out.double().sum(dim=-1), torch.ones(rows, dtype=torch.float64),
                               rtol=0, atol=2e-2 if dtype != torch.float32 else 1e-3)
    # A cold row is (almost) one-hot on its argmax; a hot one (almost) uniform.
    cold, hot = out[0].double(), out[-1].double()
    assert cold.argmax() == scores[0].cpu().double().argmax()
    if cols > 1000:
        assert cold.max() > 0.5
        assert hot.max() < 50.0 / cols


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [128256, 257])
def test_row_scale_equals_dividing_the_logits(device, cols):
    """What the sampler used to do: softmax(logits / t[:, None]) in two passes (equal up to
    float32 summation order over 128k columns)."""
    temps = torch.tensor([0.2, 0.8, 1.0, 1.7, 3.0], device=device)
    x = logits((5, cols), seed=3).to(device)
    out = torch.empty_like(x)
    ops.fused_softmax(out, x, row_scale=temps.reciprocal())
    torch.testing.assert_close(out, torch.softmax(x / temps[:, None], dim=-1), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal_offset", [None, 0, -2])
def test_row_scale_over_batched_rows_and_causal_mask(device, causal_offset):
    """row_scale indexes the rows of scores viewed as [-1, last dim] (here [2 * 6, 9]),
    and composes with the causal mask (fully masked rows stay zeros)."""
    scores = logits((2, 6, 9), seed=5).to(device)
    row_scale = torch.linspace(0.25, 4.0, 12).to(device)
    out = torch.empty_like(scores)
    ops.fused_softmax(out, scores, 0.5, causal_offset, row_scale=row_scale)
    ref = torch.empty(scores.shape, dtype=torch.float64)
    reference.fused_softmax(ref, scores.double().cpu(), 0.5, causal_offset, row_scale.double().cpu())
    assert rel_err(out.cpu(), ref) < 1e-5
    # The reference itself, row by row, against torch.softmax of the scaled scores.
    flat = scores.double().cpu().reshape(12, 9) * 0.5 * row_scale.double().cpu()[:, None]
    if causal_offset is None:
        torch.testing.assert_close(ref.reshape(12, 9), torch.softmax(flat, dim=-1))
    else:
        assert torch.all(out[:, : max(0, -causal_offset), :] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_row_scale_none_and_ones_agree(device):
    x = logits((4, 3000), seed=9).to(device)
    a, b = torch.empty_like(x), torch.empty_like(x)
    ops.fused_softmax(a, x, 0.7)
    ops.fused_softmax(b, x, 0.7, row_scale=torch.ones(4, device=device))
    assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_logits_stay_zero_under_row_scale(device):
    """Top-k leaves -inf logits: they must come out 0 whatever the row's scale."""
    x = logits((3, 5000), seed=11).to(device)
    x[:, 100:] = float("-inf")
    out = torch.empty_like(x)
    ops.fused_softmax(out, x, row_scale=torch.tensor([1e3, 1.0, 1e-2], device=device))
    assert torch.all(out[:, 100:] == 0) and not torch.isnan(out).any()
    torch.testing.assert_close(out.sum(dim=-1), torch.ones(3, device=device), rtol=0, atol=1e-5)


def _bad(row_scale):
    return dict(out=torch.empty(3, 8), scores=torch.randn(3, 8), row_scale=row_scale)


@pytest.mark.parametrize("row_scale,error,words", [
    (torch.ones(3, dtype=torch.float64), TypeError, "row_scale"),
    (torch.ones(3, dtype=torch.float16), TypeError, "row_scale"),
    (torch.ones(4), ValueError, "row_scale"),
    (torch.ones(2), ValueError, "row_scale.*num_rows"),
    (torch.ones(3, 1), ValueError, "row_scale"),
    (torch.ones(6)[::2], ValueError, "row_scale.*contiguous"),
])
def test_bad_row_scale_names_the_argument(row_scale, error, words):
    with pytest.raises(error, match=words):
        ops.fused_softmax(**_bad(row_scale))


def test_row_scale_shape_counts_every_leading_dim():
    scores = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="row_scale"):
        ops.fused_softmax(torch.empty_like(scores), scores, row_scale=torch.ones(3))
    with pytest.raises(ValueError, match="row_scale"):
        reference.fused_softmax(torch.empty_like(scores), scores, row_scale=torch.ones(3))
    out = torch.empty_like(scores)
    ops.fused_softmax(out, scores, row_scale=torch.ones(6))
    torch.testing.assert_close(out, torch.softmax(scores, dim=-1))


@pytest.mark.cuda
def test_row_scale_on_another_device_is_refused():
    scores = torch.randn(3, 8, device="cuda")
    with pytest.raises(ValueError, match="row_scale.*same device"):
        ops.fused_softmax(torch.empty_like(scores), scores, row_scale=torch.ones(3))


# -- the sampler uses it ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_sampler_per_row_temperature_uses_row_scale(device, monkeypatch):
    """Rows with different temperatures: one fused_softmax call with row_scale = 1 / t,
    on the undivided logits; the draws follow softmax(logits / t) row by row."""
    calls = []
    real = ops.fused_softmax

    def spy(out, scores, scale=1.0, causal_offset=None, row_scale=None):
        calls.append((scores, scale, row_scale))
        return real(out, scores, scale, causal_offset, row_scale)
    monkeypatch.setattr(ops, "fused_softmax", spy)

    vocab, draws = 6, 4000
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temps = [0.5, 2.0, 0.0]                                      # the last row is greedy
    params = [SamplingParams(temperature=t) for t in temps]
    x = row.repeat(len(temps) * draws, 1).to(device)
    batch = SamplingBatch.from_requests(params * draws, [None] * (len(temps) * draws),
                                        [None] * (len(temps) * draws), [[]] * (len(temps) * draws),
                                        device, vocab_size=vocab)
    assert batch.shared_temperature is None
    ids = Sampler()(x, batch).sampled_token_ids.cpu().view(draws, len(temps))
    assert len(calls) == 1
    scores, scale, row_scale = calls[0]
    assert scale == 1.0 and torch.equal(scores, x)
    torch.testing.assert_close(row_scale.cpu(), torch.tensor([2.0, 0.5, 1.0] * draws))
    for j, t in enumerate(temps[:2]):
        freq = torch.bincount(ids[:, j], minlength=vocab).double() / draws
        expected = torch.softmax(row.double() / t, dim=-1)
        assert (freq - expected).abs().max() < 0.035, (t, freq, expected)
    assert torch.all(ids[:, 2] == 0)                              # greedy: argmax


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_shared_temperature_is_the_scalar_scale(device, monkeypatch):
    calls = []
    real = ops.fused_softmax

    def spy(out, scores, scale=1.0, causal_offset=None, row_scale=None):
        calls.append((scale, row_scale))
        return real(out, scores, scale, causal_offset, row_scale)
    monkeypatch.setattr(ops, "fused_softmax", spy)
    params = [SamplingParams(temperature=0.25), SamplingParams(temperature=0),
              SamplingParams(temperature=0.25, top_k=3)]
    batch = SamplingBatch.from_requests(params, [None] * 3, [None] * 3, [[]] * 3, device,
                                        vocab_size=50)
    Sampler()(logits((3, 50), seed=1).to(device), batch)
    assert calls == [(4.0, None)]
