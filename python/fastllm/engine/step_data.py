"""The plain data one step hands across: Scheduler -> ModelRunner -> Scheduler.

    SchedulerOutput = Scheduler.schedule()       what to run, and the block moves first
    RunnerOutput = ModelRunner.execute(SchedulerOutput)   what was sampled
    Scheduler.update(SchedulerOutput, RunnerOutput)       all the bookkeeping after it

Only ints, strings, lists, dicts, SamplingParams and (structured outputs) one numpy
array: no live Sequence, no tensor, no grammar object. Both
pickle, so a runner in a worker process (tensor / pipeline parallelism) receives and
returns exactly what the in-process runner does. The runner keys what it caches per
request (seeded generators, the prompt on the device) by request id, learns a request
from `new_requests` the first step it is scheduled and forgets it when its id comes
back in `finished_request_ids`.

Structured outputs: the scheduler fills the next-token bitmask of the constrained
sequences it samples this step on the host, `grammar_bitmask` [R, ceil(V/32)] int32 (bit
t % 32 of word t // 32 set = token t allowed), row i for sequence `grammar_seq_ids[i]`
(all n rows of a forking prompt use its row). A runner needs no grammar state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fastllm.outputs import Logprob
from fastllm.sampling_params import SamplingParams


@dataclass
class NewRequest:
    """A request the runner has not seen yet (sent once, the first step it runs)."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class ScheduledSeq:
    """One sequence's share of the step: tokens [start, start + len(token_ids)) are fed.
    Made per sequence per step: slots, and every field given (no defaults)."""
    __slots__ = ("request_id", "seq_id", "token_ids", "start", "block_table", "num_samples",
                 "num_output_tokens", "output_token_ids")
    request_id: str
    seq_id: int
    token_ids: list[int]          # the tokens fed this step (a prefill chunk, or 1 to decode)
    start: int                    # tokens whose KV is already cached = the first position fed
    block_table: list[int]        # KV block ids, covering at least start + len(token_ids)
    num_samples: int              # 0 mid-prefill; 1; n when the prompt completes and forks
    num_output_tokens: int        # output tokens before this step (min_tokens)
    output_token_ids: Optional[list[int]]   # all so far, for requests with penalties; else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)     # in feeding order
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)   # runner state to drop
    # Block moves for the runner, applied before the forward pass (fastllm.engine.kv_cache):
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, CPU block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)   # (CPU block, GPU block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)      # (src, dst): fork copies
    grammar_bitmask: Optional[np.ndarray] = None    # [R, ceil(V/32)] int32; None: no constrained row
    grammar_seq_ids: list[int] = field(default_factory=list)   # the seq id of each bitmask row

    @property
    def has_cache_ops(self) -> bool:
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.has_cache_ops and not self.finished_request_ids


@dataclass
class SampledToken:
    __slots__ = ("token_id", "logprob", "top_logprobs")   # one per sampled row per step
    token_id: int
    logprob: Optional[float]
    top_logprobs: Optional[dict[int, Logprob]]    # chosen + top-N, when asked


@dataclass
class RunnerOutput:
    """Per scheduled sequence, in SchedulerOutput.scheduled's order: its seq id and the
    tokens sampled for it -- none mid-prefill; the n first tokens of n samples when its
    prompt forks; otherwise the tokens it advances by, in order (one per step today;
    k accepted tokens under speculative decoding)."""
    seq_ids: list[int] = field(default_factory=list)
    sampled: list[list[SampledToken]] = field(default_factory=list)
