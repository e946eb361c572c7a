"""Verification of draft tokens that keeps the target model's distribution exactly
(speculative sampling, Leviathan et al. / Chen et al. 2023).

For a sequence with d drafts x_1..x_d, target distributions p_1..p_{d+1} (p_j: the
distribution of the token after the j-1 first drafts, as the plain sampler would draw
it) and draft distributions q_1..q_d: draft x_j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)), in order; at the first rejection the token comes from
norm(max(0, p_j - q_j)) and the rest is dropped; when all d are accepted a bonus token
is drawn from p_{d+1}. q = None means one-hot drafts (n-gram lookup, a greedy draft
model): accept with probability p_j(x_j), resample from p_j with x_j removed. Greedy is
the special case of one-hot p: accept iff x_j is the argmax (greedy_verify, on the host
from the argmax ids alone).

Shapes: B sequences, K = the most drafts any has (rows padded), V the vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch


def _num_accepted(accept: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """[B] leading accepted drafts; accept [B, K] bool (padding rows ignored)."""
    valid = torch.arange(accept.shape[1], device=accept.device) < num_drafts.unsqueeze(1)
    return (accept & valid).to(torch.int64).cumprod(dim=1).sum(dim=1)


def _assemble(draft_ids: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> list[list[int]]:
    """Per sequence: its accepted drafts then `last` (the correction or bonus token)."""
    drafts, counts, lasts = draft_ids.tolist(), num_accepted.tolist(), last.tolist()
    return [row[:n] + [t] for row, n, t in zip(drafts, counts, lasts)]


def greedy_verify(target_argmax: list[list[int]], drafts: list[list[int]]) -> list[list[int]]:
    """Per sequence: the target's argmax at its d + 1 positions and its d drafts ->
    the drafts up to the first that differs from the argmax, then the argmax there."""
    out = []
    for argmax, row in zip(target_argmax, drafts):
        if len(argmax) != len(row) + 1:
            raise ValueError(f"greedy_verify: {len(row)} drafts need {len(row) + 1} argmax ids, "
                             f"got {len(argmax)}")
        n = 0
        while n < len(row) and row[n] == argmax[n]:
            n += 1
        out.append(row[:n] + [argmax[n]])
    return out


def rejection_sample(target_probs: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor,
                     draft_probs: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """target_probs [B, K+1, V] (rows sum to 1; padding rows anything finite),
    draft_ids [B, K] int64 (padding >= 0), num_drafts [B] int64, draft_probs [B, K, V] or
    None (one-hot drafts) -> per row its 1..d+1 output tokens."""
    batch, k1, vocab = target_probs.shape
    k = k1 - 1
    if draft_ids.shape != (batch, k) or num_drafts.shape != (batch,):
        raise ValueError(f"draft_ids must be [{batch}, {k}] and num_drafts [{batch}], got "
                         f"{tuple(draft_ids.shape)} and {tuple(num_drafts.shape)}")
    p_x = target_probs[:, :k].gather(2, draft_ids.unsqueeze(2)).squeeze(2)          # [B, K]
    q_x = (torch.ones_like(p_x) if draft_probs is None
           else draft_probs.gather(2, draft_ids.unsqueeze(2)).squeeze(2))
    u = torch.rand(p_x.shape, generator=generator, device=p_x.device, dtype=p_x.dtype)
    # u < p/q without the division (q_x > 0: the draft sampled x).
    accepted = _num_accepted(u * q_x < p_x, num_drafts)
    # The distribution of the last token: p at the first rejected position, minus q there
    # when something was rejected (the bonus position, accepted == num_drafts, keeps p).
    rows = torch.arange(batch, device=p_x.device)
    final = target_probs[rows, accepted]                                            # [B, V]
    rejected = accepted < num_drafts
    if bool(rejected.any()):
        pos = accepted.clamp(max=max(k - 1, 0))
        if draft_probs is None:
            q = torch.zeros_like(final).scatter_(1, draft_ids[rows, pos].unsqueeze(1), 1.0)
        else:
            q = draft_probs[rows, pos]
        residual = (final - q).clamp(min=0)
        # p == q exactly (accepted with probability 1) leaves nothing: keep p then.
        mass = residual.sum(dim=1, keepdim=True)
        residual = torch.where(mass > 0, residual, final)
        final = torch.where(rejected.unsqueeze(1), residual, final)
    last = torch.multinomial(final, 1, generator=generator).squeeze(1)
    return _assemble(draft_ids, accepted, last)
