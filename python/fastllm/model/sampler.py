"""Batched sampling: one row of logits per sequence, per-row SamplingParams.

    batch = SamplingBatch.from_requests(params, generators, prompt_token_ids,
                                        output_token_ids, device, vocab_size=V)
    out = Sampler()(logits, batch)          # logits [S, V]
    out.sampled_token_ids                   # [S] int64

Order of operations (vLLM's v0 order):
  1. raw logprobs = log_softmax(logits) -- what `logprobs` reports, as vLLM does by default
  2. min_tokens: rows that have produced fewer than min_tokens tokens cannot pick a
     stop token (SamplingParams.all_stop_token_ids: stop_token_ids, and the eos ids
     unless ignore_eos)
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


def _flat_token_index(token_lists: Sequence, rows: Sequence[int], device):
    """(row [N], token_id [N]) int64 tensors of every token in token_lists[r] for r in
    rows. An entry is a list of ids or a 1-D int64 CPU tensor (a cached prompt)."""
    parts = [torch.as_tensor(token_lists[r], dtype=torch.long) for r in rows]
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.long)
    row_ids = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), lengths)
    ids = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return row_ids.to(device), ids.to(device)


@dataclass
class SamplingBatch:
    """Per-row sampling tensors for one step. Row i is sequence i of the logits.

    Everything the sampler would otherwise read back from the device (the widest top-k,
    whether the random rows share one temperature) is worked out here, on the host, from
    the Python params: a decode step then costs one device->host sync (the sampled ids)."""
    num_rows: int
    is_greedy: torch.Tensor              # [S] bool
    temperature: torch.Tensor            # [S] float32, 1.0 on greedy rows
    shared_temperature: Optional[float]  # the one temperature of every random row, else None
    all_greedy: bool
    top_k: Optional[torch.Tensor]        # [S] int64, 0 = off; None when no row uses it
    max_top_k: int                       # largest top_k asked for (0 when top_k is None)
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
                      prompt_token_ids: Sequence,
                      output_token_ids: Sequence,
                      device="cpu", *,
                      num_output_tokens: Optional[Sequence[int]] = None,
                      vocab_size: Optional[int] = None) -> "SamplingBatch":
        """Build the batch once per step. All lists are per row (one row per sequence
        being sampled). prompt_token_ids / output_token_ids are read only on rows whose
        params have penalties (others may hold None); an entry is a list of ids or a 1-D
        int64 CPU tensor. num_output_tokens (for min_tokens) defaults to the lengths of
        output_token_ids. Stop ids banned by min_tokens come from
        SamplingParams.all_stop_token_ids; those >= vocab_size are dropped (never sampled)."""
        num_rows = len(params)
        lists = [("generators", generators), ("prompt_token_ids", prompt_token_ids),
                 ("output_token_ids", output_token_ids)]
        if num_output_tokens is not None:
            lists.append(("num_output_tokens", num_output_tokens))
        for name, values in lists:
            if len(values) != num_rows:
                raise ValueError(f"{name} has {len(values)} rows but params has {num_rows}")
        if num_rows == 0:
            raise ValueError("params is empty: a SamplingBatch needs at least one row")
        if num_output_tokens is None:
            num_output_tokens = [len(ids) for ids in output_token_ids]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        is_greedy = [p.is_greedy for p in params]
        temperature = column([1.0 if g else p.temperature for p, g in zip(params, is_greedy)],
                             torch.float32)
        random_params = [p for p, g in zip(params, is_greedy) if not g]
        temps = {p.temperature for p in random_params}
        shared_temperature = temps.pop() if len(temps) == 1 else None
        top_k = top_p = min_p = None
        max_top_k = 0
        if any(p.top_k > 0 for p in random_params):
            ks = [0 if g else max(p.top_k, 0) for p, g in zip(params, is_greedy)]
            top_k = column(ks, torch.long)
            max_top_k = max(ks)
        if any(p.top_p < 1.0 for p in random_params):
            top_p = column([1.0 if g else p.top_p for p, g in zip(params, is_greedy)], torch.float32)
        if any(p.min_p > 0.0 for p in random_params):
            min_p = column([0.0 if g else p.min_p for p, g in zip(params, is_greedy)], torch.float32)

        presence = frequency = repetition = prompt_tokens = output_tokens = None
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        if penalized:
            # Rows without penalties keep count 0 / penalty 1: their logits are untouched,
            # so only the penalized rows' tokens are flattened.
            presence = column([p.presence_penalty for p in params], torch.float32)
            frequency = column([p.frequency_penalty for p in params], torch.float32)
            repetition = column([p.repetition_penalty for p in params], torch.float32)
            output_tokens = _flat_token_index(output_token_ids, penalized, device)
            repeated = [i for i in penalized if params[i].repetition_penalty != 1.0]
            if repeated:
                prompt_tokens = _flat_token_index(prompt_token_ids, repeated, device)

        banned = [[] for _ in params]
        for i, p in enumerate(params):
            if num_output_tokens[i] < p.min_tokens:
                banned[i] = sorted(t for t in p.all_stop_token_ids
                                   if vocab_size is None or t < vocab_size)
        banned_rows = [i for i, ids in enumerate(banned) if ids]
        banned_tokens = _flat_token_index(banned, banned_rows, device) if banned_rows else None

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]
        return cls(
            num_rows=num_rows, is_greedy=column(is_greedy, torch.bool), temperature=temperature,
            shared_temperature=shared_temperature, all_greedy=all(is_greedy), top_k=top_k,
            max_top_k=max_top_k, top_p=top_p, min_p=min_p,
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


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, vLLM semantics: a token seen in prompt or output has its logit divided
    by the repetition penalty when positive, multiplied when not; then
    logit -= frequency * count_in_output + presence * (count_in_output > 0)."""
    num_rows, vocab_size = logits.shape
    out_rows, out_ids = batch.output_tokens
    counts = torch.zeros(num_rows, vocab_size, dtype=logits.dtype, device=logits.device)
    counts.index_put_((out_rows, out_ids), torch.ones_like(out_ids, dtype=logits.dtype),
                      accumulate=True)
    seen_in_output = counts > 0
    if batch.prompt_tokens is not None:
        prompt_rows, prompt_ids = batch.prompt_tokens
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
        k_max = min(batch.max_top_k, logits.shape[1])
        # The k-th largest logit of each row is its threshold; ties with it survive.
        kth = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
        logits = logits.masked_fill((logits < kth) & enabled.unsqueeze(1), float("-inf"))

    probs = torch.empty_like(logits)
    if batch.shared_temperature is not None:
        # One temperature for every random row: the fused kernel applies it as its scale.
        ops.fused_softmax(probs, logits, 1.0 / batch.shared_temperature)
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
        # Work in float32. Only the min_tokens ban and the penalties write into the logits
        # (the filters below are out of place), so copy the caller's tensor only for them.
        if logits.dtype != torch.float32:
            logits = logits.float()
        elif batch.banned_tokens is not None or batch.output_tokens is not None:
            logits = logits.clone()

        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        if batch.banned_tokens is not None:
            rows, ids = batch.banned_tokens      # ids beyond the vocab were dropped on the host
            logits[rows, ids] = float("-inf")
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
