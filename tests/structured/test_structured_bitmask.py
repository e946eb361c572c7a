"""ops.apply_token_bitmask (xgrammar's kernels) and its torch twin against a per-token
Python loop over the bits, and the sampler applying it to the constrained rows only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastllm import ops, reference
from fastllm.model.sampler import Sampler, SamplingBatch
from fastllm.sampling_params import SamplingParams


def _expected(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.double().clone()
    words = bitmask.tolist()
    for i, r in enumerate(rows):
        for t in range(logits.shape[1]):
            word = t // 32
            allowed = word < len(words[i]) and (words[i][word] >> (t % 32)) & 1
            if not allowed:
                out[r, t] = -math.inf
    return out


def _case(num_rows, vocab, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen)
    width = (vocab + 31) // 32
    bitmask = torch.randint(-(1 << 31), 1 << 31, (len(rows), width), generator=gen, dtype=torch.int64)
    return logits, bitmask.to(torch.int32), torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("impl", ["ops", "reference"])
@pytest.mark.parametrize("num_rows, vocab, rows", [(5, 100, [4, 0, 2]), (3, 64, [0, 1, 2]),
                                                   (1, 33, [0]), (6, 384, [5])])
def test_apply_token_bitmask_matches_bitwise_loop(impl, num_rows, vocab, rows):
    logits, bitmask, row_t = _case(num_rows, vocab, rows)
    want = _expected(logits, bitmask, rows)
    fn = ops.apply_token_bitmask if impl == "ops" else reference.apply_token_bitmask
    fn(logits, bitmask, row_t)
    torch.testing.assert_close(logits.double(), want, rtol=0, atol=0)


def test_apply_token_bitmask_checks_shapes():
    logits, bitmask, rows = _case(3, 64, [0, 1])
    with pytest.raises(ValueError, match="int32"):
        ops.apply_token_bitmask(logits, bitmask.long(), rows)
    with pytest.raises(ValueError, match="rows"):
        ops.apply_token_bitmask(logits, bitmask, rows[:1])


@pytest.mark.cuda
def test_apply_token_bitmask_cuda_matches_cpu():
    logits, bitmask, rows = _case(7, 1000, [6, 1, 3])
    want = logits.clone()
    reference.apply_token_bitmask(want, bitmask, rows)
    dev = logits.cuda()
    ops.apply_token_bitmask(dev, bitmask.cuda(), rows.cuda())
    torch.testing.assert_close(dev.cpu(), want, rtol=0, atol=0)


def _single_token_mask(token: int, width: int) -> np.ndarray:
    mask = np.zeros(width, dtype=np.int64)
    mask[token // 32] = 1 << (token % 32)
    return mask.astype(np.uint32).view(np.int32)


def test_sampler_masks_constrained_rows_only_and_reports_masked_logprobs():
    vocab, width = 100, 4
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, vocab, generator=gen)
    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0, logprobs=1),
              SamplingParams(temperature=0.9, seed=5, logprobs=1)]
    allowed = {0: [7, 70], 2: [41]}     # rows 0 and 2 constrained, row 1 free
    mask = np.zeros((2, width), dtype=np.int32)
    for i, (row, tokens) in enumerate(allowed.items()):
        for t in tokens:
            mask[i] |= _single_token_mask(t, width)
    batch = SamplingBatch.from_requests(params, [None, None, torch.Generator().manual_seed(5)],
                                        [None] * 3, [[]] * 3,
                                        token_bitmask=(np.array([0, 2]), mask))
    out = Sampler()(logits.clone(), batch)
    ids = out.sampled_token_ids.tolist()
    assert ids[0] == max(allowed[0], key=lambda t: logits[0, t].item())
    assert ids[1] == int(logits[1].argmax())
    assert ids[2] == 41
    # Logprobs of the masked distribution: row 2 has one allowed token (log 1 = 0), row 0
    # renormalised over its two, row 1 over the whole vocabulary.
    lp = out.sampled_logprobs.double()
    two = torch.log_softmax(logits[0, allowed[0]].double(), 0)[allowed[0].index(ids[0])]
    torch.testing.assert_close(lp[0], two, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp[1], torch.log_softmax(logits[1].double(), 0)[ids[1]], rtol=1e-5, atol=1e-5)
    assert abs(lp[2].item()) < 1e-6
