"""A step's device inputs, packed on the host from the SchedulerOutput's plain data.

For S scheduled sequences with q_i tokens each (prefill chunks and decodes mixed), the
model sees one super-sequence of T = sum(q_i) tokens (seeds/001):
  input_ids, positions, slot_mapping  [T]
  block_tables [S, max_blocks] int32, seq_lens [S] int32 (cached + this step's tokens),
  query_start_loc [S+1] int32
and returns the logits of each sequence's last query token, [S, V]. Only rows whose
known tokens are all computed after this step are sampled (a mid-prefill chunk is not).

The index tensors and the sampling batch are each written into one host buffer and
uploaded from pinned staging memory (fastllm.engine.staging) before the forward pass is
launched, so on a GPU the only wait per step is reading back the sampled ids.

What the runner keeps per request (RequestStates) is keyed by request id and rebuilt
from plain data alone, so a runner in another process holds the same: the request's
SamplingParams, its prompt (uploaded once, when a repetition penalty needs it) and its
torch.Generator when seeded (made from the seed on the runner's device, shared by its
n samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence as Sequence_

import numpy as np
import torch

from fastllm.engine.staging import StagingBuffer
from fastllm.engine.step_data import SampledToken, ScheduledSeq, SchedulerOutput
from fastllm.model.layers import AttentionMetadata, AttentionSpec
from fastllm.model.sampler import SamplerOutput, SamplingBatch, StagedBatch, make_generator
from fastllm.outputs import Logprob
from fastllm.sampling_params import SamplingParams


@dataclass
class RequestState:
    params: SamplingParams
    prompt_token_ids: list[int]
    generator: Optional[torch.Generator]
    device_prompt: Optional[torch.Tensor] = None   # [P] int64, once a penalty needed it


class RequestStates:
    """request id -> RequestState: learnt from SchedulerOutput.new_requests, dropped on
    its finished_request_ids."""

    def __init__(self, device: torch.device):
        self.device = device
        self._states: dict[str, RequestState] = {}

    def update(self, out: SchedulerOutput) -> None:
        for rid in out.finished_request_ids:      # first: a finished id may be reused
            self._states.pop(rid, None)
        for new in out.new_requests:
            self._states[new.request_id] = RequestState(
                new.sampling_params, new.prompt_token_ids,
                make_generator(new.sampling_params, self.device))

    def __getitem__(self, request_id: str) -> RequestState:
        return self._states[request_id]

    def __len__(self) -> int:
        return len(self._states)


@dataclass
class SamplingStep:
    """A step's sampling, built before its forward pass (see InputBatch.prepare_sampling)."""
    rows: list[int]                       # per sampled row: its scheduled sequence's index
    params: list[SamplingParams]          # per sampled row
    row_index: Optional[torch.Tensor]     # [R] int64 logits rows to sample; None: all, in order
    chunks: list[tuple[int, int, SamplingBatch]]   # (start, end, batch), <= max_num_seqs rows each


class InputBatch:
    def __init__(self, device: torch.device, block_size: int, max_num_seqs: int, vocab_size: int):
        self.device = device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        # One buffer per upload of a step, so none is overwritten before its copy has left it.
        self._index_staging = StagingBuffer(device)      # prepare()'s index tensors
        self._sampling_staging = StagingBuffer(device)   # the sampling batch

    def prepare(self, scheduled: list[ScheduledSeq], spec: Optional[AttentionSpec] = None) -> tuple:
        """(input_ids, positions, AttentionMetadata) for the scheduled mix; with the layers'
        spec, the metadata plans the step's attention once (else the model plans it). Everything is
        written into one int64 host buffer, laid out as
            input_ids [T] | positions [T] | slot_mapping [T] | seq_lens [S] |
            query_start_loc [S+1] | block_tables [S * max_blocks]
        and copied to the device at once; the tensors are views of the device copy (the
        int32 ones cast there)."""
        num_seqs = len(scheduled)
        num_tokens = sum(s.num_tokens for s in scheduled)
        max_blocks = max(len(s.block_table) for s in scheduled)
        t3, s1 = 3 * num_tokens, 3 * num_tokens + num_seqs
        total = s1 + num_seqs + 1 + num_seqs * max_blocks
        host = self._index_staging.host(8 * total).view(torch.int64)
        buf = host.numpy()
        block_tables = buf[s1 + num_seqs + 1:total].reshape(num_seqs, max_blocks)
        self._fill_indices(scheduled, buf[:num_tokens], buf[num_tokens:2 * num_tokens],
                           buf[2 * num_tokens:t3], buf[t3:s1], buf[s1:s1 + num_seqs + 1], block_tables)
        dev = self._index_staging.upload(host)
        meta = AttentionMetadata(
            slot_mapping=dev[2 * num_tokens:t3],
            block_tables=dev[s1 + num_seqs + 1:total].view(num_seqs, max_blocks).to(torch.int32),
            seq_lens=dev[t3:s1].to(torch.int32),
            query_start_loc=dev[s1:s1 + num_seqs + 1].to(torch.int32),
            max_query_len=max(s.num_tokens for s in scheduled), spec=spec)
        return dev[:num_tokens], dev[num_tokens:2 * num_tokens], meta

    def _fill_indices(self, scheduled, ids, pos, slots, seq_lens, query_start_loc, block_tables) -> None:
        bs = self.block_size
        block_tables.fill(0)
        query_start_loc[0] = 0
        t = 0
        for i, s in enumerate(scheduled):
            q, start, table = s.num_tokens, s.start, s.block_table
            if len(table) * bs < start + q:
                # Indexing the zero-padded row would silently write block 0 (another
                # sequence's KV): a scheduler bug must fail loudly instead.
                raise RuntimeError(
                    f"sequence {s.seq_id} (request {s.request_id!r}): block_table has "
                    f"{len(table)} blocks of {bs} tokens, too few for positions "
                    f"[{start}, {start + q})")
            block_tables[i, :len(table)] = table
            if q == 1:                                   # decode: no numpy temporaries
                ids[t] = s.token_ids[0]
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
            else:
                p = np.arange(start, start + q, dtype=np.int64)
                ids[t:t + q] = s.token_ids
                pos[t:t + q] = p
                slots[t:t + q] = np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs
            t += q
            seq_lens[i] = start + q
            query_start_loc[i + 1] = t

    def prepare_sampling(self, scheduled: list[ScheduledSeq], requests: RequestStates,
                         grammar_bitmask: Optional[np.ndarray] = None,
                         grammar_seq_ids: Sequence_[int] = ()) -> Optional[SamplingStep]:
        """The step's sampling batches (None when no row is sampled), all uploaded in one
        pinned copy. A step samples more rows than max_num_seqs only when n > 1 prompts
        complete together; it is then split into chunks of max_num_seqs rows, the most
        the sampler's memory was profiled for. grammar_bitmask / grammar_seq_ids: the
        SchedulerOutput's structured-output masks (row i for sequence grammar_seq_ids[i])."""
        rows, states, params, gens, prompts, outputs, num_outputs = [], [], [], [], [], [], []
        mask_of_seq = {seq_id: j for j, seq_id in enumerate(grammar_seq_ids)}
        mask_rows: list[int] = []         # per sampled row: its bitmask row, -1 = unconstrained
        for i, s in enumerate(scheduled):
            if not s.num_samples:
                continue
            mask_row = mask_of_seq.get(s.seq_id, -1) if mask_of_seq else -1
            mask_rows.extend([mask_row] * s.num_samples)     # a fork's n rows share its mask
            state = requests[s.request_id]
            p = state.params
            # The prompt only for the repetition penalty (most requests have none); it
            # goes up once per request: later steps pass its cached device tensor.
            prompt = None
            if p.repetition_penalty != 1.0:
                prompt = state.device_prompt if state.device_prompt is not None else state.prompt_token_ids
            for _ in range(s.num_samples):
                rows.append(i)
                states.append(state)
                params.append(p)
                gens.append(state.generator)
                prompts.append(prompt)
                outputs.append(s.output_token_ids)
                num_outputs.append(s.num_output_tokens)
        if not rows:
            return None
        staged: list[tuple[int, int, StagedBatch]] = []
        arrays = {}
        for c, a in enumerate(range(0, len(rows), self.max_num_seqs)):
            b = min(a + self.max_num_seqs, len(rows))
            st = SamplingBatch.stage(params[a:b], gens[a:b], prompts[a:b], outputs[a:b], self.device,
                                     num_output_tokens=num_outputs[a:b], vocab_size=self.vocab_size,
                                     token_bitmask=_chunk_bitmask(grammar_bitmask, mask_rows[a:b]))
            staged.append((a, b, st))
            arrays.update((f"{c}/{name}", v) for name, v in st.arrays.items())
        in_order = rows == list(range(len(scheduled)))    # else some rows mid-prefill, or a fork
        if not in_order:
            arrays["rows"] = np.asarray(rows, dtype=np.int64)
        dev = self._sampling_staging.pack(arrays)
        chunks = []
        for c, (a, b, st) in enumerate(staged):
            prefix = f"{c}/"
            batch = st.finish({k[len(prefix):]: v for k, v in dev.items() if k.startswith(prefix)})
            for j, tensor in batch.prompt_token_tensors.items():
                if states[a + j].device_prompt is None:
                    states[a + j].device_prompt = tensor
            chunks.append((a, b, batch))
        return SamplingStep(rows=rows, params=params, chunks=chunks,
                            row_index=None if in_order else dev["rows"])


def _chunk_bitmask(grammar_bitmask: Optional[np.ndarray], mask_rows: list[int]) -> Optional[tuple]:
    """(rows in the chunk, their bitmask rows) for the chunk's constrained rows, or None."""
    if grammar_bitmask is None:
        return None
    local = [r for r, m in enumerate(mask_rows) if m >= 0]
    if not local:
        return None
    return np.asarray(local, dtype=np.int64), grammar_bitmask[[mask_rows[r] for r in local]]


def sampled_tokens(sampled: SamplerOutput, params: list[SamplingParams]) -> list[SampledToken]:
    """The sampler's tensors as plain data, one SampledToken per row (logprobs where asked)."""
    token_ids = sampled.sampled_token_ids.tolist()       # the step's one wait for the device
    if sampled.sampled_logprobs is None:
        return [SampledToken(t, None, None) for t in token_ids]
    lps = sampled.sampled_logprobs.tolist()
    ranks = sampled.sampled_ranks.tolist()
    top_lp = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
    top_ids = sampled.top_token_ids.tolist() if sampled.top_token_ids is not None else None
    tokens = []
    for j, p in enumerate(params):
        if p.logprobs is None:
            tokens.append(SampledToken(token_ids[j], None, None))
            continue
        top = {token_ids[j]: Logprob(lps[j], ranks[j])}
        for r in range(p.logprobs if top_ids is not None else 0):
            top.setdefault(top_ids[j][r], Logprob(top_lp[j][r], r + 1))
        tokens.append(SampledToken(token_ids[j], lps[j], top))
    return tokens
