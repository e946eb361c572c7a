"""What `LLM.generate` returns, named and shaped as vLLM's outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """One candidate token's log probability (raw log-softmax of the model's logits)."""
    logprob: float
    rank: Optional[int] = None             # 1 = most likely token
    decoded_token: Optional[str] = None


# Per generated position: token id -> Logprob (the chosen token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int                              # which of the request's n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None     # "stop" | "length" | "abort" | None (still running)
    stop_reason: Union[int, str, None] = None  # the stop string or stop token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life; None where not reached."""
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    num_spec_draft_tokens: int = 0      # speculative decoding: drafts verified, accepted
    num_spec_accepted_tokens: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: Optional[RequestMetrics] = None
