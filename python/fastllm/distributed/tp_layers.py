"""Tensor-parallel layers over a TP Communicator (fastllm.distributed.communicator).

Column-parallel projections (fused q|k|v, gate|up) need no layer of their own: each rank
holds its output rows as a plain nn.Linear, and its output stays sharded. What needs
communication is here:

    RowParallelLinear       each rank its input columns; partial sums all_reduced, the
                            bias added once, after the reduce (o_proj, down_proj)
    VocabParallelEmbedding  each rank a run of vocabulary rows; ids outside it embed to
                            zeros, then all_reduce
    ParallelLMHead          each rank its vocabulary rows; logits all_gathered, the
                            padding columns cut off

With one rank the make_* factories return the plain torch layers (same numerics, same
parameters as before tensor parallelism existed).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastllm.distributed.communicator import Communicator
from fastllm.distributed.sharding import padded_vocab_size


def vocab_rows(vocab_size: int, tp: Communicator) -> tuple[int, int, int]:
    """(rows per rank, this rank's first vocabulary id, how many of its rows are real
    ids): the last ranks' rows past vocab_size are padding, kept at zero."""
    rows = padded_vocab_size(vocab_size, tp.world_size) // tp.world_size
    start = tp.rank * rows
    return rows, start, max(0, min(rows, vocab_size - start))


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b; W_local [out, in_local] (this rank's columns)."""

    def __init__(self, in_features_local: int, out_features: int, bias: bool, tp: Communicator):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features_local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))          # [T, out], summed over ranks
        if self.bias is not None:
            y += self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows_per_rank) of the padded vocabulary on this rank."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: Communicator):
        super().__init__()
        self.tp = tp
        self.rows_per_rank, self.start, self.num_real_rows = vocab_rows(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] int64 -> [T, hidden]."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary rows (the same split as VocabParallelEmbedding, so a tied
    head shares its weight)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: Communicator):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        rows, self.start, self.num_real_rows = vocab_rows(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab_size] on every rank."""
        logits = self.tp.all_gather(F.linear(hidden, self.weight), dim=-1)   # [S, padded]
        if logits.shape[-1] != self.vocab_size:
            logits = logits[:, :self.vocab_size].contiguous()
        return logits


def make_row_linear(in_features_local: int, out_features: int, bias: bool,
                    tp: Optional[Communicator]) -> nn.Module:
    if tp is None or tp.world_size == 1:
        return nn.Linear(in_features_local, out_features, bias=bias)
    return RowParallelLinear(in_features_local, out_features, bias, tp)


def make_embedding(vocab_size: int, hidden_size: int, tp: Optional[Communicator]) -> nn.Module:
    if tp is None or tp.world_size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def make_lm_head(vocab_size: int, hidden_size: int, tp: Optional[Communicator]) -> nn.Module:
    if tp is None or tp.world_size == 1:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(vocab_size, hidden_size, tp)
