"""Batched sampling: one row of logits per sequence, per-row SamplingParams.

    batch = SamplingBatch.from_requests(params, generators, prompt_token_ids,
                                        output_token_ids, device, vocab_size=V)
    out = Sampler()(logits, batch)          # logits [S, V]
    out.sampled_token_ids                   # [S] int64

from_requests = stage (host only: numpy arrays, no device access) + upload + finish. An
engine stages the batch before launching the forward pass and uploads the arrays in one
pinned copy (InputBatch.prepare_sampling), so building it never waits for the device.

Order of operations (vLLM's v0 order):
  0. structured outputs: constrained rows' disallowed tokens -> -inf (ops.apply_token_bitmask)
  1. raw logprobs = log_softmax(logits) -- what `logprobs` reports, as vLLM does by default
  2. min_tokens: rows that have produced fewer than min_tokens tokens cannot pick a
     stop token (SamplingParams.all_stop_token_ids: stop_token_ids, and the eos ids
     unless ignore_eos)
  3. penalties: repetition over prompt + output tokens, presence/frequency over output
  4. greedy rows: argmax of the penalized logits
  5. random rows: temperature, top-k, softmax (fastllm.ops.fused_softmax: scale =
     1/temperature when the rows share one, else row_scale = 1/temperature per row),
     top-p, min-p, then one draw by the exponential race
     argmax(p / q), q ~ Exp(1): equivalent to sampling from p without renormalizing,
     and each seeded row draws q from its own torch.Generator, so a request's samples
     do not depend on what else is in the batch.

Everything is whole-batch tensor work; the only Python loops are over the rows that
carry their own generator (one exponential_ call each) and over the request lists
when the batch is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
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


def _flat_token_index(token_lists: Sequence, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row [N], token_id [N]) int64 host arrays of every token in token_lists[r] for r
    in rows. An entry is a list of ids or a 1-D integer tensor."""
    parts = [np.asarray(token_lists[r], dtype=np.int64).reshape(-1) for r in rows]
    lengths = [len(p) for p in parts]
    row_ids = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    ids = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return row_ids, ids


def plain_upload(arrays: dict, device) -> dict:
    """name -> numpy array to name -> tensor on `device`, one copy each (from pageable
    memory: the engine's runner packs them into one pinned copy instead)."""
    return {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in arrays.items()}


@dataclass
class StagedBatch:
    """A SamplingBatch's host half: the per-row values as numpy arrays (`arrays`, for
    the caller to upload, ideally in one copy) and what stays on the host; finish()
    turns the uploaded arrays into the SamplingBatch. Building it reads nothing from the
    device, so it can run while the device is busy."""
    arrays: dict                      # name -> np.ndarray to upload
    fields: dict                      # SamplingBatch fields known on the host
    device: torch.device
    # Repetition-penalty prompts: (row, tensor already on the device, or None when its
    # ids are in arrays["new_prompt_ids"]), in row order; new_prompt_lens for the latter.
    prompts: list
    new_prompt_lens: list

    def finish(self, dev: dict) -> "SamplingBatch":
        """dev: the uploaded `arrays` (same names, on self.device)."""
        fields = dict(self.fields)
        for name in ("is_greedy", "temperature", "top_k", "top_p", "min_p",
                     "presence_penalty", "frequency_penalty", "repetition_penalty"):
            fields[name] = dev.get(name)
        for name in ("output_tokens", "banned_tokens"):
            fields[name] = (dev[name + ".rows"], dev[name + ".ids"]) if name + ".rows" in dev else None
        fields["prompt_tokens"], fields["prompt_token_tensors"] = self._prompt_tokens(dev)
        fields["token_bitmask"] = ((dev["token_bitmask.rows"], dev["token_bitmask"])
                                   if "token_bitmask" in dev else None)
        return SamplingBatch(**fields)

    def _prompt_tokens(self, dev: dict):
        if not self.prompts:
            return None, {}
        # Fresh prompts were uploaded back to back; a clone of each (a device-side copy)
        # is what callers may keep, so it does not hold the whole step's upload alive.
        fresh = dev["new_prompt_ids"].split(self.new_prompt_lens) if self.new_prompt_lens else ()
        fresh = iter(fresh)
        tensors = {row: (t if t is not None else next(fresh).clone()) for row, t in self.prompts}
        parts = [tensors[row] for row, _ in self.prompts]
        ids = torch.cat(parts)
        # output_size: the length is known on the host, so no device -> host sync.
        rows = torch.repeat_interleave(dev["prompt.rows"], dev["prompt.lens"],
                                       output_size=int(sum(p.numel() for p in parts)))
        return (rows, ids), tensors


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
    # row -> its prompt as a [P] int64 tensor on the device (repetition-penalty rows), for
    # callers to pass back next step instead of the ids (no re-upload).
    prompt_token_tensors: dict = field(default_factory=dict)
    # Structured outputs: (rows [R] int64, bitmask [R, ceil(V/32)] int32): row rows[i] may
    # only sample the tokens bitmask[i] allows. None when no row is constrained.
    token_bitmask: Optional[tuple] = None

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams],
                      generators: Sequence[Optional[torch.Generator]],
                      prompt_token_ids: Sequence,
                      output_token_ids: Sequence,
                      device="cpu", *,
                      num_output_tokens: Optional[Sequence[int]] = None,
                      vocab_size: Optional[int] = None,
                      token_bitmask: Optional[tuple] = None,
                      upload: Optional[Callable[[dict], dict]] = None) -> "SamplingBatch":
        """Build the batch once per step: stage() on the host, upload, finish().
        upload: name -> numpy array to name -> tensor on `device` (default plain_upload)."""
        staged = cls.stage(params, generators, prompt_token_ids, output_token_ids, device,
                           num_output_tokens=num_output_tokens, vocab_size=vocab_size,
                           token_bitmask=token_bitmask)
        dev = upload(staged.arrays) if upload is not None else plain_upload(staged.arrays, device)
        return staged.finish(dev)

    @staticmethod
    def stage(params: Sequence[SamplingParams],
              generators: Sequence[Optional[torch.Generator]],
              prompt_token_ids: Sequence,
              output_token_ids: Sequence,
              device="cpu", *,
              num_output_tokens: Optional[Sequence[int]] = None,
              vocab_size: Optional[int] = None,
              token_bitmask: Optional[tuple] = None) -> StagedBatch:
        """The host half of the batch. All lists are per row (one row per sequence being
        sampled). prompt_token_ids / output_token_ids are read only on rows whose params
        have penalties (others may hold None); an entry is a list of ids or a 1-D int64
        tensor, and a prompt tensor already on `device` is used as is (not uploaded).
        num_output_tokens (for min_tokens) defaults to the lengths of output_token_ids.
        Stop ids banned by min_tokens come from SamplingParams.all_stop_token_ids; those
        >= vocab_size are dropped (never sampled). token_bitmask: (rows, bitmask) host
        arrays of the constrained rows (see SamplingBatch.token_bitmask), or None."""
        device = torch.device(device)
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

        arrays: dict = {}
        is_greedy = [p.is_greedy for p in params]
        arrays["is_greedy"] = np.array(is_greedy, dtype=np.bool_)
        arrays["temperature"] = np.array([1.0 if g else p.temperature for p, g in zip(params, is_greedy)],
                                         dtype=np.float32)
        random_params = [p for p, g in zip(params, is_greedy) if not g]
        temps = {p.temperature for p in random_params}
        shared_temperature = temps.pop() if len(temps) == 1 else None
        max_top_k = _stage_filters(params, is_greedy, arrays)
        prompts, new_prompts = _stage_penalties(params, prompt_token_ids, output_token_ids,
                                                device, arrays)
        _stage_banned(params, num_output_tokens, vocab_size, arrays)
        if token_bitmask is not None:
            rows, bitmask = token_bitmask
            arrays["token_bitmask.rows"] = np.asarray(rows, dtype=np.int64)
            arrays["token_bitmask"] = np.asarray(bitmask, dtype=np.int32)

        num_logprobs = [p.logprobs for p in params]
        asked = [n for n in num_logprobs if n is not None]
        fields = dict(num_rows=num_rows, shared_temperature=shared_temperature,
                      all_greedy=all(is_greedy), max_top_k=max_top_k,
                      generators=list(generators), num_logprobs=num_logprobs,
                      max_num_logprobs=max(asked) if asked else None)
        return StagedBatch(arrays=arrays, fields=fields, device=device, prompts=prompts,
                           new_prompt_lens=[len(p) for p in new_prompts])


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor                 # [S] int64
    # Only when some row asked for logprobs (all from the raw log-softmax):
    sampled_logprobs: Optional[torch.Tensor] = None  # [S] float32, the chosen token's
    sampled_ranks: Optional[torch.Tensor] = None     # [S] int64, 1 = most likely
    top_logprobs: Optional[torch.Tensor] = None      # [S, N] float32, N = max requested
    top_token_ids: Optional[torch.Tensor] = None     # [S, N] int64; row i uses its first num_logprobs[i]



def _stage_filters(params, is_greedy, arrays: dict) -> int:
    """top_k / top_p / min_p arrays, only when some random row uses them; -> max top_k."""
    random_params = [p for p, g in zip(params, is_greedy) if not g]
    max_top_k = 0
    if any(p.top_k > 0 for p in random_params):
        ks = [0 if g else max(p.top_k, 0) for p, g in zip(params, is_greedy)]
        arrays["top_k"] = np.array(ks, dtype=np.int64)
        max_top_k = max(ks)
    if any(p.top_p < 1.0 for p in random_params):
        arrays["top_p"] = np.array([1.0 if g else p.top_p for p, g in zip(params, is_greedy)],
                                   dtype=np.float32)
    if any(p.min_p > 0.0 for p in random_params):
        arrays["min_p"] = np.array([0.0 if g else p.min_p for p, g in zip(params, is_greedy)],
                                   dtype=np.float32)
    return max_top_k


def _stage_penalties(params, prompt_token_ids, output_token_ids, device, arrays: dict):
    """Penalty arrays and flat token indices; -> (prompts: [(row, device tensor or None)],
    new_prompts: host id arrays still to upload)."""
    prompts, new_prompts = [], []
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    if not penalized:
        return prompts, new_prompts
    # Rows without penalties keep count 0 / penalty 1: their logits are untouched,
    # so only the penalized rows' tokens are flattened.
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        arrays[name] = np.array([getattr(p, name) for p in params], dtype=np.float32)
    arrays["output_tokens.rows"], arrays["output_tokens.ids"] = _flat_token_index(
        output_token_ids, penalized)
    repeated = [i for i in penalized if params[i].repetition_penalty != 1.0]
    lens = []
    for i in repeated:
        entry = prompt_token_ids[i]
        if isinstance(entry, torch.Tensor) and _same_device(entry.device, torch.device(device)):
            prompts.append((i, entry.reshape(-1)))
            lens.append(entry.numel())
        else:
            if isinstance(entry, torch.Tensor):
                entry = entry.cpu()
            ids = np.asarray(entry, dtype=np.int64).reshape(-1)
            prompts.append((i, None))
            new_prompts.append(ids)
            lens.append(len(ids))
    if repeated:
        arrays["prompt.rows"] = np.array(repeated, dtype=np.int64)
        arrays["prompt.lens"] = np.array(lens, dtype=np.int64)
    if new_prompts:
        arrays["new_prompt_ids"] = np.concatenate(new_prompts)
    return prompts, new_prompts


def _stage_banned(params, num_output_tokens, vocab_size, arrays: dict) -> None:
    """Stop ids banned while a row is under min_tokens (ids >= vocab_size dropped)."""
    banned = [[] for _ in params]
    for i, p in enumerate(params):
        if num_output_tokens[i] < p.min_tokens:
            banned[i] = sorted(t for t in p.all_stop_token_ids
                               if vocab_size is None or t < vocab_size)
    banned_rows = [i for i, ids in enumerate(banned) if ids]
    if banned_rows:
        arrays["banned_tokens.rows"], arrays["banned_tokens.ids"] = _flat_token_index(
            banned, banned_rows)

def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """In place, vLLM semantics: a token seen in prompt or output has its logit divided
    by the repetition penalty when positive, multiplied when not; then
    logit -= frequency * count_in_output + presence * (count_in_output > 0)."""
    num_rows, vocab_size = logits.shape
    out_rows, out_ids = batch.output_tokens
    # Flat index_add_ / index_fill_: no host-side index checks (an index_put_ may read its
    # indices back to the host, a sync per step on some torch versions).
    counts = torch.zeros(num_rows, vocab_size, dtype=logits.dtype, device=logits.device)
    counts.view(-1).index_add_(0, out_rows * vocab_size + out_ids,
                               torch.ones_like(out_ids, dtype=logits.dtype))
    seen_in_output = counts > 0
    if batch.prompt_tokens is not None:
        prompt_rows, prompt_ids = batch.prompt_tokens
        seen = seen_in_output.clone()
        seen.view(-1).index_fill_(0, prompt_rows * vocab_size + prompt_ids, True)
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

    # Temperature inside the fused kernel: one read and one write of [S, V], never a
    # divided copy of the logits. One temperature for every random row is its scalar scale;
    # otherwise each row's 1 / temperature ([S], greedy rows 1) is its row_scale.
    probs = torch.empty_like(logits)
    if batch.shared_temperature is not None:
        ops.fused_softmax(probs, logits, 1.0 / batch.shared_temperature)
    else:
        ops.fused_softmax(probs, logits, row_scale=batch.temperature.reciprocal())

    if batch.top_p is not None:
        # Keep the smallest most-likely set whose mass reaches top_p: a token goes when
        # the mass of the tokens ranked above it already reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        top_p = torch.where(batch.top_p < 1.0, batch.top_p, torch.full_like(batch.top_p, 2.0))
        drop_sorted = mass_above >= top_p.unsqueeze(1)
        # The most likely token always stays: a top_p that float32 rounds to 0 would
        # otherwise drop every token and the race would return id 0.
        drop_sorted[:, 0] = False
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
    """valid_vocab_size: ids >= it are never sampled (nor reported in logprobs): a
    model whose embedding is padded past its tokenizer (Qwen2.5: 151936 rows, 151665
    tokens) has logits for ids that decode to nothing. None = every logits column is
    an id. The mask is one fill of the padded columns per step, written into the
    caller's logits when the sampler works on them directly (their values there are
    meaningless anyway)."""

    def __init__(self, valid_vocab_size: Optional[int] = None):
        if valid_vocab_size is not None and (not isinstance(valid_vocab_size, int)
                                             or valid_vocab_size < 1):
            raise ValueError(f"valid_vocab_size must be a positive integer, got {valid_vocab_size!r}")
        self.valid_vocab_size = valid_vocab_size

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
        elif (batch.banned_tokens is not None or batch.output_tokens is not None
              or batch.token_bitmask is not None):
            logits = logits.clone()

        if self.valid_vocab_size is not None and self.valid_vocab_size < logits.shape[1]:
            logits[:, self.valid_vocab_size:] = float("-inf")
        if batch.token_bitmask is not None:
            # Structured outputs, one pass over the constrained rows only, before
            # everything else: logprobs are those of the masked distribution.
            ops.apply_token_bitmask(logits, batch.token_bitmask[1], batch.token_bitmask[0])

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
                width = min(logits.shape[1], self.valid_vocab_size or logits.shape[1])
                top = raw_logprobs.topk(min(batch.max_num_logprobs, width), dim=-1)
                out.top_logprobs, out.top_token_ids = top.values, top.indices
        return out


def _same_device(a: torch.device, b: torch.device) -> bool:
    """a == b, reading a CUDA device without an index as the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
