"""SpeculativeConfig: what LLM(speculative_config=...) and --speculative-config take.

    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    {"method": "draft_model", "model": "/path/to/draft", "num_speculative_tokens": 4}

Which requests speculate (speculation_allowed): those whose next-token distribution is
the same at every scored position and needs no per-position output. Off for a request with
penalties (they change with each accepted token), logprobs (asked for every position),
a seed (its own generator's exact stream) or structured outputs (a grammar state per
position); while a request is under min_tokens the scheduler does not speculate for it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional, Union

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 32


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4        # ngram: longest suffix looked up
    prompt_lookup_min: int = 2        # ngram: shortest suffix looked up
    model: Optional[str] = None       # draft_model: the draft checkpoint (same vocabulary)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, 1, 1 << 16)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1, self.prompt_lookup_max)
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ValueError("speculative_config.model (the draft model's path) is required "
                                 "for method 'draft_model'")
        elif self.model is not None:
            raise ValueError(f"speculative_config.model is only for method 'draft_model', "
                             f"not {self.method!r}")

    @classmethod
    def from_value(cls, value: Union[None, str, dict, "SpeculativeConfig"]) -> Optional["SpeculativeConfig"]:
        """None, a SpeculativeConfig, a dict or its JSON text -> SpeculativeConfig or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or its JSON), got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {unknown}; known: {sorted(known)}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**value)


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"speculative_config.{name} must be an integer in [{low}, {high}], got {value!r}")


def speculation_allowed(params) -> bool:
    """Whether a request with these SamplingParams may speculate at all (see the module doc)."""
    if params.has_penalties or params.logprobs is not None:
        return False
    if params.seed is not None and not params.is_greedy:
        return False
    return getattr(params, "structured_outputs", None) is None
