"""The runner's half of speculative decoding: which logits rows a step needs, and the
verification of each speculating sequence's drafts against them.

A sequence with d drafts feeds 1 + d tokens [last, x_1..x_d]; all d + 1 of their rows
are scored (row j: the target's distribution of the token after x_1..x_j). Every other
sequence keeps its one last row. Rows are laid out sequence by sequence, so sequence i's
last row is its offset + d_i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastllm.engine.step_data import SampledToken, ScheduledSeq
from fastllm.model.sampler import Sampler, SamplingBatch
from fastllm.spec_decode.rejection_sampler import greedy_verify, rejection_sample


@dataclass
class SpecRows:
    logits_indices: list[int]     # [R] token rows of the step to score
    last_rows: list[int]          # [S] per sequence, its last row among the R
    spec_seqs: list[int]          # indices of the sequences with drafts
    spec_rows: list[int]          # their d_i + 1 rows each, in order, among the R


def plan_rows(scheduled: list[ScheduledSeq]) -> Optional[SpecRows]:
    """None when no sequence carries drafts (the model's default last rows)."""
    if not any(s.num_draft_tokens for s in scheduled):
        return None
    plan = SpecRows([], [], [], [])
    end = 0
    for i, s in enumerate(scheduled):
        end += s.num_tokens
        d = s.num_draft_tokens
        if d:
            plan.spec_seqs.append(i)
            plan.spec_rows.extend(range(len(plan.logits_indices), len(plan.logits_indices) + d + 1))
        plan.logits_indices.extend(range(end - 1 - d, end))
        plan.last_rows.append(len(plan.logits_indices) - 1)
    return plan


def verify(sampler: Sampler, logits: torch.Tensor, seqs: list[ScheduledSeq], params: list,
           vocab_size: int) -> list[list[SampledToken]]:
    """logits [sum(d_i + 1), V]: the scored rows of `seqs` (each with d_i >= 1 drafts
    ending its token_ids) in order; params: their SamplingParams. -> per sequence its
    1..d_i+1 tokens (accepted drafts, then the correction or bonus token)."""
    device = logits.device
    counts = [s.num_draft_tokens for s in seqs]
    drafts = [s.token_ids[len(s.token_ids) - d:] for s, d in zip(seqs, counts)]
    if all(p.is_greedy for p in params):
        if sampler.valid_vocab_size is not None and sampler.valid_vocab_size < logits.shape[1]:
            logits = logits[:, :sampler.valid_vocab_size]
        ids = logits.argmax(dim=-1).tolist()                 # the step's one device sync
        starts = [0]
        for d in counts:
            starts.append(starts[-1] + d + 1)
        tokens = greedy_verify([ids[a:b] for a, b in zip(starts, starts[1:])], drafts)
        return [[SampledToken(t, None, None) for t in row] for row in tokens]
    k = max(counts)
    row_params, num_outputs, dest = [], [], []
    for b, (s, p) in enumerate(zip(seqs, params)):
        for j in range(s.num_draft_tokens + 1):
            row_params.append(p)
            num_outputs.append(s.num_output_tokens + j)
            dest.append(b * (k + 1) + j)
    drafts = torch.tensor([row + [0] * (k - len(row)) for row in drafts], dtype=torch.int64,
                          device=device)
    num_drafts = torch.tensor(counts, dtype=torch.int64, device=device)
    dest = torch.tensor(dest, dtype=torch.int64, device=device)
    none = [None] * len(row_params)
    batch = SamplingBatch.from_requests(row_params, none, none, none, device,
                                        num_output_tokens=num_outputs, vocab_size=vocab_size)
    # Greedy rows among random ones: processed_probs makes their p one-hot.
    probs = sampler.processed_probs(logits, batch)                           # [R, V]
    padded = torch.zeros(len(seqs) * (k + 1), probs.shape[1], dtype=probs.dtype, device=device)
    padded[dest] = probs
    tokens = rejection_sample(padded.view(len(seqs), k + 1, -1), drafts, num_drafts)
    return [[SampledToken(t, None, None) for t in row] for row in tokens]
