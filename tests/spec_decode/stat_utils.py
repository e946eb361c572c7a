"""Chi-square goodness of fit without scipy: the p-value is the regularized upper
incomplete gamma function Q(df / 2, stat / 2) (torch.special.gammaincc)."""
import torch

SIGNIFICANCE = 1e-3     # fixed: a correct sampler fails this one time in a thousand


def chi_square_pvalue(counts, probs, min_expected: float = 5.0) -> float:
    """counts [V] observed, probs [V] expected distribution (sums to 1). Bins expected
    under min_expected are pooled into one; a count in a bin of probability 0 -> 0."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    probs = torch.as_tensor(probs, dtype=torch.float64)
    total = counts.sum()
    if bool((counts[probs <= 0] > 0).any()):
        return 0.0
    expected = probs * total
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    if df < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))
