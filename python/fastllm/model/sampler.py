"""Batched sampling: one row of logits per sequence, per-row SamplingParams.

    batch = SamplingBatch.from_requests(params, generators, prompt_token_ids,
                                        output_token_ids, device, eos_token_ids)
    out = Sampler()(logits, batch)          # logits [S, V]
    out.sampled_token_ids                   # [S] int64

Order of operations (vLLM's v0 order):
  1. raw logprobs = log_softmax(logits) -- what `logprobs` reports, as vLLM does by default
  2. min_tokens: rows that have produced fewer than min_tokens tokens cannot pick a
     stop token (stop_token_ids, and the eos ids unless ignore_eos)
  3. penalties: repetition over prompt + output tokens, presence/frequency over output
  4. greedy rows: argmax of the penalized logits
  5. random rows: temperature, top-k, softmax (fastllm.ops.fused_softmax, scale =
     1/temperature), top-p, min-p, then one draw by the exponential race
     argmax(p / q), q ~ Exp(1): equivalent to sampling from p without renormalizing,
     and each seeded row draws q from its own torch.Generator, so a request's samples
     do not depend on what else is in the batch.

Everything is whole-batch tensor work; the only Python loops are over the rows that
carry their own generator (one exponential_ call each) and over the request lists
when the batch is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fastllm import ops
from fastllm.sampling_params import SamplingParams


def make_generator(params: SamplingParams, device) -> Optional[torch.Generator]:
    """A request's own generator when it has a seed (None -> the global generator)."""
    if params.seed is None or params.is_greedy:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(params.seed)
    return generator


def _flat_token_index(token_lists: Sequence[Sequence[int]], device):
    """(row [N], token_id [N]) int64 tensors of every token in every row's list."""
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    ids = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long)
    return rows.to(device), ids.to(device)


@dataclass
class SamplingBatch:
    """Per-row sampling tensors for one step. Row i is sequence i of the logits."""
    num_rows: int
    is_greedy: torch.Tensor              # [S] bool
    temperature: torch.Tensor            # [S] float32, 1.0 on greedy rows
    all_greedy: bool
    top_k: Optional[torch.Tensor]        # [S] int64, 0 = off; None when no row uses it
    top_p: Optional[torch.Tensor]        # [S] float32; None when no row uses it
    min_p: Optional[torch.Tensor]        # [S] float32; None when no row uses it
    presence_penalty: Optional[torch.Tensor]    # [S]; these three are None when no
    frequency_penalty: Optional[torch.Tensor]   # row has a penalty
    repetition_penalty: Optional[torch.Tensor]
    prompt_tokens: Optional[tuple]       # (rows [N], ids [N]) for the repetition penalty
    output_tokens: Optional[tuple]       # (rows [M], ids [M]) for all three penalties
    banned_tokens: Optional[tuple]       # (rows, ids) masked to -inf (min_tokens)
    generators: list                     # [S] torch.Generator | None
    num_logprobs: list                   # [S] int | None
    max_num_logprobs: Optional[int]      # None when no row asks for logprobs

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams],
                      generators: Sequence[Optional[torch.Generator]],
                      prompt_token_ids: Sequence[Sequence[int]],
                      output_token_ids: Sequence[Sequence[int]],
                      device="cpu",
                      eos_token_ids: Sequence[int] = ()) -> "SamplingBatch":
        """Build the batch once per step. All lists are per row (one row per sequence
        being sampled); `eos_token_ids` are the model's, used only for min_tokens."""
        num_rows = len(params)
        for name, values in (("generators", generators), ("prompt_token_ids", prompt_token_ids),
                             ("output_token_ids", output_token_ids)):
            if len(values) != num_rows:
                raise ValueError(f"{name} has {len(values)} rows but params has {num_rows}")
        if num_rows == 0:
            raise ValueError("params is empty: a SamplingBatch needs at least one row")

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        is_greedy = [p.is_greedy for p in params]
        temperature = column([1.0 if g else p.temperature for p, g in zip(params, is_greedy)],
                             torch.float32)
        random_params = [p for p, g in zip(params, is_greedy) if not g]
        top_k = top_p = min_p = None
        if any(p.top_k > 0 for p in random_params):
            top_k = column([0 if g else max(p.top_k, 0) for p, g in zip(params, is_greedy)], torch.long)
        if any(p.top_p < 1.0 for p in random_params):
            top_p = column([1.0 if g else p.top_p for p, g in zip(params, is_greedy)], torch.float32)
        if any(p.min_p > 0.0 for p in random_params):
            min_p = column([0.0 if g else p.min_p for p, g in zip(params, is_greedy)], torch.float32)

        presence = frequency = repetition = prompt_tokens = output_tokens = None
        if any(p.has_penalties for p in params):
            presence = column([p.presence_penalty for p in params], torch.float32)
            frequency = column([p.frequency_penalty for p in params], torch.float32)
            repetition = column([p.repetition_penalty for p in params], torch.float32)
            output_tokens = _flat_token_index(output_token_ids, device)
            if any(p.repetition_penalty != 1.0 for p in params):
                prompt_tokens = _flat_token_index(prompt_token_ids, device)

        banned = [[] for _ in params]
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                stop_ids = set(p.stop_token_ids)
                if not p.ignore_eos:
                    stop_ids.update(eos_token_ids)
                banned[i] = sorted(stop_ids)
        banned_tokens = _flat_token_index(banned, device) if any(banned) else None

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]
        return cls(
            num_rows=num_rows, is_greedy=column(is_greedy, torch.bool), temperature=temperature,
            all_greedy=all(is_greedy), top_k=top_k, top_p=top_p, min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition,
            prompt_tokens=prompt_tokens, output_tokens=output_tokens, banned_tokens=banned_tokens,
            generators=list(generators), num_logprobs=num_logprobs,
            max_num_logprobs=max(asked) if asked else None,
        )


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor                 # [S] int64
    # Only when some row asked for logprobs (all from the raw log-softmax):
    sampled_logprobs: Optional[torch.Tensor] = None  # [S] float32, the chosen token's
    sampled_ranks: Optional[torch.Tensor] = None     # [S] int64, 1 = most likely
    top_logprobs: Optional[torch.Tensor] = None      # [S, N] float32, N = max requested
    top_token_ids: Optional[torch.Tensor] = None     # [S, N] int64; row i uses its first num_logprobs[i]


def _check_token_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds a token id outside [0, {vocab_size}) (vocab of the logits)")


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, vLLM semantics: a token seen in prompt or output has its logit divided
    by the repetition penalty when positive, multiplied when not; then
    logit -= frequency * count_in_output + presence * (count_in_output > 0)."""
    num_rows, vocab_size = logits.shape
    out_rows, out_ids = batch.output_tokens
    _check_token_ids(out_ids, vocab_size, "output_token_ids")
    counts = torch.zeros(num_rows, vocab_size, dtype=logits.dtype, device=logits.device)
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=logits.dtype),
                      accumulate=True)
    seen_in_output = counts > 0
    if batch.prompt_tokens is not None:
        prompt_rows, prompt_ids = batch.prompt_tokens
        _check_token_ids(prompt_ids, vocab_size, "prompt_token_ids")
        seen = seen_in_output.clone()
        seen[prompt_rows, prompt_ids] = True
        penalty = batch.repetition_penalty.unsqueeze(1).expand_as(logits)
        penalty = torch.where(seen, penalty, torch.ones_like(penalty))
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    logits -= batch.frequency_penalty.unsqueeze(1) * counts
    logits -= batch.presence_penalty.unsqueeze(1) * seen_in_output.to(logits.dtype)


def _random_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[S, V] probabilities after temperature, top-k, top-p and min-p (zeros where
    filtered; rows are not renormalized after top-p/min-p, the race does not need it)."""
    if batch.top_k is not None:
        # Rows without top-k take k = 1 for the gather and are left unmasked, so the
        # topk below is only as wide as the largest k actually asked for.
        enabled = batch.top_k > 0
        k = batch.top_k.clamp(min=1, max=logits.shape[1])
        k_max = int(k.max())
        # The k-th largest logit of each row is its threshold; ties with it survive.
        kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill((logits < kth) & enabled.unsqueeze(1), float("-inf"))

    probs = torch.empty_like(logits)
    temps = batch.temperature[~batch.is_greedy]
    t0 = float(temps[0])
    if bool((temps == t0).all()):
        # One temperature for every random row: the fused kernel applies it as its scale.
        ops.fused_softmax(probs, logits, 1.0 / t0)
    else:
        ops.fused_softmax(probs, logits / batch.temperature.unsqueeze(1), 1.0)

    if batch.top_p is not None:
        # Keep the smallest most-likely set whose mass reaches top_p: a token goes when
        # the mass of the tokens ranked above it already reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p = torch.where(batch.top_p < 1.0, batch.top_p, torch.full_like(batch.top_p, 2.0))
        drop_sorted = mass_above >= top_p.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)

    if batch.min_p is not None:
        # Relative to the most likely token, so it is the same before or after renormalizing.
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _exponential_race(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    q = torch.empty_like(probs)
    q.exponential_()                       # global generator for rows without a seed
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            q[row].exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [num_rows={batch.num_rows}, vocab_size], "
                             f"got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        # float32 copy: penalties and filters write into it, the caller's tensor stays as is.
        logits = logits.to(torch.float32, copy=True)

        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if batch.banned_tokens is not None:
            rows, ids = batch.banned_tokens
            keep = ids < logits.shape[1]   # a stop id beyond the vocab can never be sampled
            logits[rows[keep], ids[keep]] = float("-inf")
        if batch.output_tokens is not None:
            apply_penalties(logits, batch)

        sampled = logits.argmax(dim=-1)
        if not batch.all_greedy:
            random_ids = _exponential_race(_random_probs(logits, batch), batch)
            sampled = torch.where(batch.is_greedy, sampled, random_ids)

        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, sampled.unsqueeze(1))
            out.sampled_logprobs = chosen.squeeze(1)
            out.sampled_ranks = (raw_logprobs > chosen).sum(dim=-1) + 1
            if batch.max_num_logprobs > 0:
                top = raw_logprobs.topk(min(batch.max_num_logprobs, logits.shape[1]), dim=-1)
                out.top_logprobs, out.top_token_ids = top.values, top.indices
        return out
