"""The rejection sampler on given p / q: every emitted position is distributed as the
target p (chi-square, many trials and seeds, fixed threshold), the acceptance rate is
sum_x min(p, q), greedy verification is argmax matching; hand-checked cases."""
import pytest
import torch

from fastllm.spec_decode.rejection_sampler import greedy_verify, rejection_sample
from stat_utils import SIGNIFICANCE, chi_square_pvalue

V, K, TRIALS = 12, 3, 30000


def random_dists(gen, sharp: float):
    logits = sharp * torch.randn(K + 1, V, generator=gen, dtype=torch.float64)
    logits[:, 0] = float("-inf")          # a token the target never picks
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("one_hot_q", [False, True])
def test_emitted_positions_follow_target(seed, one_hot_q):
    """p_j fixed per position (so position j's output should be ~ p_j whatever came
    before); drafts x_j ~ q_j (q_j puts mass where p_j has none too, and q one-hot =
    n-gram / greedy drafts). Position j is emitted only when j drafts were accepted."""
    gen = torch.Generator().manual_seed(seed)
    p = random_dists(gen, 1.5)
    q = torch.softmax(1.5 * torch.randn(K, V, generator=gen, dtype=torch.float64), dim=-1)
    if one_hot_q:
        # Deterministic drafts: a fixed token per position (q its one-hot).
        fixed = torch.randint(0, V, (K,), generator=gen)
        drafts = fixed.expand(TRIALS, K).clone()
        q = torch.nn.functional.one_hot(fixed, V).double()
    else:
        drafts = torch.stack([torch.multinomial(q[j], TRIALS, replacement=True, generator=gen)
                              for j in range(K)], dim=1)
    num_drafts = torch.full((TRIALS,), K, dtype=torch.int64)
    out = rejection_sample(p.expand(TRIALS, K + 1, V).float(), drafts, num_drafts,
                           None if one_hot_q else q.expand(TRIALS, K, V).float(), generator=gen)
    assert all(1 <= len(row) <= K + 1 for row in out)
    for j in range(K + 1):
        tokens = torch.tensor([row[j] for row in out if len(row) > j])
        if tokens.numel() < 200:
            continue
        pvalue = chi_square_pvalue(torch.bincount(tokens, minlength=V), p[j])
        assert pvalue > SIGNIFICANCE, f"position {j}: chi-square p = {pvalue:.2e}"
    # Acceptance of draft 0: P = sum_x min(p_0(x), q_0(x)) (5 sigma of a binomial).
    accepted = torch.tensor([len(row) > 1 for row in out], dtype=torch.float64).mean()
    want = torch.minimum(p[0], q[0]).sum()
    assert abs(accepted - want) < 5 * (want * (1 - want) / TRIALS).sqrt() + 1e-9


def test_padding_rows_and_varying_num_drafts():
    """Rows with fewer drafts stop there: a row with 0 drafts gets one token from p_0;
    one-hot p accepts exactly the matching drafts."""
    p = torch.zeros(3, K + 1, V)
    target = torch.tensor([[4, 5, 6, 7]] * 3)
    p.scatter_(2, target.unsqueeze(2), 1.0)
    drafts = torch.tensor([[4, 5, 6], [4, 9, 6], [1, 1, 1]])
    out = rejection_sample(p, drafts, torch.tensor([3, 3, 0]))
    assert out == [[4, 5, 6, 7], [4, 5], [4]]


def test_greedy_verify_by_hand():
    argmax = [[1, 2, 3, 4], [1, 2, 3, 4], [7, 8, 9], [5]]
    drafts = [[1, 2, 3], [1, 5, 3], [7, 8], []]
    assert greedy_verify(argmax, drafts) == [[1, 2, 3, 4], [1, 2], [7, 8, 9], [5]]
    with pytest.raises(ValueError, match="argmax"):
        greedy_verify([[1, 2]], [[1, 2]])


def test_shape_mismatch_is_value_error():
    with pytest.raises(ValueError, match="draft_ids"):
        rejection_sample(torch.rand(2, 4, V), torch.zeros(2, 2, dtype=torch.int64),
                         torch.tensor([2, 2]))
