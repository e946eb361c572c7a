"""Per-sequence state the scheduler and block manager share.

A request with SamplingParams.n > 1 is one `SequenceGroup` holding n `Sequence`s: the
first one prefills the prompt; when its prompt completes, n tokens are sampled from the
same logits row and the group forks (see BlockManager.fork), after which every sample is
scheduled, preempted and finished on its own.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import Optional

_seq_ids = itertools.count()
# The finished statuses' values: a str set lookup (this is asked per sequence per step).
_FINISHED_VALUES = frozenset(("stop", "length", "abort"))


class SequenceStatus(enum.Enum):
    WAITING = "waiting"            # never scheduled, or preempted by recompute (num_computed_tokens = 0)
    RUNNING = "running"
    SWAPPED = "swapped"            # preempted with its KV copied to CPU memory
    FINISHED_STOPPED = "stop"      # eos, stop_token_ids or a stop string
    FINISHED_LENGTH = "length"     # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self._value_ in _FINISHED_VALUES

    @property
    def finish_reason(self) -> Optional[str]:
        return self.value if self.is_finished else None


class Sequence:
    """One sample: prompt + generated token ids and where its KV lives.

    Invariant: tokens [0, num_computed_tokens) have KV in the blocks of block_table
    (block i holds positions [i*block_size, (i+1)*block_size)); the remaining tokens are
    fed to the model in later steps. A decode step feeds exactly the last sampled token.
    """

    def __init__(self, prompt_token_ids: list[int], group: "SequenceGroup", index: int = 0):
        self.seq_id = next(_seq_ids)
        self.group = group
        self.index = index                       # which of the group's n samples
        self.prompt_len = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks, extended lazily as blocks fill
        # (prefix caching); block_hashes[i] covers token_ids[:(i+1)*block_size].
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0          # leading blocks already offered to the prefix cache
        self.num_cached_tokens = 0               # prompt tokens served by the prefix cache (last admission)
        self.num_tokens_fed = 0                  # tokens this sequence fed to the model, all steps
        self.status = SequenceStatus.WAITING
        self.stop_reason = None                  # the stop string or token id that finished it
        self.swapped_kv: Optional[list[int]] = None   # CPU swap block ids while SWAPPED
        self.output_text = ""                   # detokenized output (stop string trimmed)
        self.detokenizer = None                  # incremental detokenizer (the output processor's)
        self.cumulative_logprob = None
        self.logprobs = None                     # list of {token_id: Logprob} when asked
        self.first_token_time: Optional[float] = None
        self.token_times: list[float] = []      # wall time each output token was sampled
        self.num_preemptions = 0
        # Structured outputs: this sample's grammar state (fastllm.structured), advanced by
        # the scheduler with every appended output token; None = unconstrained or not yet
        # compiled (group.structured_request says which).
        self.grammar = None

    # -- token views ---------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def arrival_time(self) -> float:
        return self.group.arrival_time

    @property
    def params(self):
        return self.group.sampling_params

    @property
    def request_id(self) -> str:
        return self.group.request_id

    def append_token(self, token_id: int, now: float) -> None:
        self.token_ids.append(int(token_id))
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def reset_for_recompute(self) -> None:
        """Preempted by recompute: KV gone, everything (prompt + outputs) is prefilled again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_registered_blocks = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1

    def sort_key(self):
        # Scheduling order: earliest arrival first; a group's samples in index order.
        return (self.group.arrival_time, self.group.order, self.index, self.seq_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table})")


class SequenceGroup:
    """One request: its SamplingParams, its samples, and its timing."""

    _order = itertools.count()

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 sampling_params, arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.order = next(SequenceGroup._order)   # tie-break for equal arrival times
        self.n = int(getattr(sampling_params, "n", 1) or 1)
        self.seqs: list[Sequence] = [Sequence(self.prompt_token_ids, self, 0)]
        self.forked = self.n == 1
        self.finish_time: Optional[float] = None
        self.first_scheduled_time: Optional[float] = None
        self.num_returned_tokens = [0] * self.n    # per sample, for delta outputs
        self.num_returned_chars = [0] * self.n
        self.structured_request = None    # StructuredOutputRequest when constrained

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        if len(self.seqs) == 1:          # n = 1: no generator per call
            return self.forked and self.seqs[0].status.is_finished
        return self.forked and all(s.status.is_finished for s in self.seqs)

    @property
    def first_token_time(self) -> Optional[float]:
        times = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        return min(times) if times else None
