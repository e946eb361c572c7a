"""Tensor-parallel layers on 2 gloo ranks against the unsharded layer, in float64."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel_ranks import run_ranks

VOCAB, HIDDEN, OUT = 13, 8, 6          # an odd vocabulary: 7 rows per rank, one padding row


def _full_weights():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(OUT, 10, generator=g, dtype=torch.float64),
            "b": torch.randn(OUT, generator=g, dtype=torch.float64),
            "x": torch.randn(5, 10, generator=g, dtype=torch.float64),
            "embed": torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64),
            "hidden": torch.randn(3, HIDDEN, generator=g, dtype=torch.float64)}


def _layers_on_rank(rank, world_size):
    from fastllm.distributed.communicator import GlooCommunicator
    from fastllm.distributed.tp_layers import (ParallelLMHead, RowParallelLinear,
                                               VocabParallelEmbedding)
    tp = GlooCommunicator(list(range(world_size)), group=dist.group.WORLD)
    full = _full_weights()
    cols = slice(rank * 5, (rank + 1) * 5)                   # this rank's 5 of 10 inputs
    row = RowParallelLinear(5, OUT, bias=True, tp=tp).double()
    embed = VocabParallelEmbedding(VOCAB, HIDDEN, tp).double()
    head = ParallelLMHead(VOCAB, HIDDEN, tp).double()
    with torch.no_grad():
        row.weight.copy_(full["w"][:, cols])
        row.bias.copy_(full["b"])
        n = embed.num_real_rows
        embed.weight.zero_()
        embed.weight[:n].copy_(full["embed"][embed.start:embed.start + n])
        head.weight.zero_()
        head.weight[:n].copy_(full["embed"][head.start:head.start + n])
    ids = torch.tensor([0, 6, 7, 12, 3, 12])                 # both ranks' ranges and their edges
    return {"row": row(full["x"][:, cols]), "embed": embed(ids), "head": head(full["hidden"]),
            "rows": (embed.start, embed.num_real_rows, embed.weight.shape[0])}


def test_row_parallel_linear_embedding_and_lm_head_match_unsharded():
    results = run_ranks(_layers_on_rank, 2)
    full = _full_weights()
    ids = torch.tensor([0, 6, 7, 12, 3, 12])
    expected = {"row": F.linear(full["x"], full["w"], full["b"]),   # bias added once
                "embed": F.embedding(ids, full["embed"]),
                "head": F.linear(full["hidden"], full["embed"])}      # [3, 13]: padding cut off
    assert [r["rows"] for r in results] == [(0, 7, 7), (7, 6, 7)]
    for r in results:                                        # every rank holds the full result
        for key, want in expected.items():
            assert r[key].shape == want.shape, key
            torch.testing.assert_close(r[key], want, rtol=1e-12, atol=1e-12, msg=key)
