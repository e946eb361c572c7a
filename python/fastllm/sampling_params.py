"""SamplingParams: how one request is sampled and when it stops (vLLM's names and rules).

Validation happens at construction, so a bad value fails where the user wrote it, with
a ValueError naming the field, instead of deep inside a batched sampler step.
"""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Optional, Union

# Below this a temperature is treated as 0 (greedy), as vLLM does: dividing logits by a
# tiny temperature overflows and changes nothing about the argmax anyway.
_SAMPLING_EPS = 1e-5
# Samples per request: n lists are built per request, so n = 10**9 would allocate
# gigabytes before anything runs (vLLM's serving floor).
MAX_N = 16384
# torch.Generator.manual_seed accepts exactly this range.
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)
# Counts go into int64 arrays and tensors.
_MAX_INT64 = (1 << 63) - 1


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names): exactly one of
        json         a JSON schema (dict, or its JSON text): the output is a JSON value it accepts
        regex        the output matches this regular expression (whole output)
        choice       the output is one of these strings
        grammar      the output follows this EBNF grammar (GBNF, root rule `root`)
        json_object  True: the output is any JSON object
    disable_any_whitespace: JSON without free whitespace between tokens (compact, as
    json.dumps(separators=(",", ":")) writes it), which also keeps a weak model from
    wandering in whitespace. Validated here for shape; the engine checks the schema,
    regex or grammar itself at add_request (ValueError naming the problem)."""
    json: Union[str, dict, None] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object is True:
            given.append("json_object")
        elif self.json_object is not False:
            raise ValueError(f"StructuredOutputsParams.json_object must be a bool, got {self.json_object!r}")
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of json, regex, choice, grammar, "
                             f"json_object; got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"StructuredOutputsParams.json must be a JSON schema (a dict or its JSON "
                             f"text), got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice \
                    or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty "
                                 f"strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("StructuredOutputsParams.disable_any_whitespace must be a bool, got "
                             f"{self.disable_any_whitespace!r}")

    @property
    def kind(self) -> str:
        """Which constraint: 'json', 'regex', 'choice', 'grammar' or 'json_object'."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


class RequestOutputKind(enum.Enum):
    """What LLMEngine.step() returns for a request (vLLM's names)."""
    CUMULATIVE = 0    # every step it produced something: everything so far
    DELTA = 1         # every step it produced something: only what is new (streaming)
    FINAL_ONLY = 2    # once, when it finishes (LLM.generate: nothing built per step)


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1        # drawn from the engine's global generator (LLM(seed=...))
    RANDOM_SEED = 2   # drawn from the request's own generator (SamplingParams.seed)


def _is_int(value) -> bool:
    """An int (not a bool) that fits in int64."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT64


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_list(value, name: str, allow_str: bool) -> list:
    """None -> [], a str -> [it] (stop), a list/tuple/set -> a list; anything else is a
    ValueError naming the field (list(5) would be a bare TypeError)."""
    if value is None:
        return []
    if allow_str and isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    kind = "a string or a list of strings" if allow_str else "a list of integers"
    raise ValueError(f"SamplingParams.{name} must be {kind}, got {value!r}")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0                # in (0, 1]; 1 = off
    top_k: int = -1                   # -1 or 0 = off
    min_p: float = 0.0                # in [0, 1]; 0 = off
    max_tokens: Optional[int] = 16    # None = until the model's max_model_len
    min_tokens: int = 0               # EOS / stop_token_ids are suppressed before this many
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    presence_penalty: float = 0.0     # in [-2, 2], over output tokens
    frequency_penalty: float = 0.0    # in [-2, 2], over output tokens
    repetition_penalty: float = 1.0   # > 0, over prompt + output tokens; 1 = off
    logprobs: Optional[int] = None    # top-N logprobs per sampled token (plus the chosen one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Optional[StructuredOutputsParams] = None   # constrain the output
    # Filled from the tokenizer by the engine (not a user knob), as vLLM's
    # _all_stop_token_ids: eos ids (unless ignore_eos) + stop_token_ids.
    all_stop_token_ids: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalize the convenient spellings first so validation sees one form.
        self.stop = _as_list(self.stop, "stop", allow_str=True)
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids", allow_str=False)
        self._validate()
        if self.temperature < _SAMPLING_EPS:
            # Greedy: the filters cannot change an argmax, so switch them off.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def fail(name: str, why: str):
            raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail("n", f"must be an integer in [1, {MAX_N}]")
        for name in ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                fail(name, "must be a finite number")
        if self.temperature < 0:
            fail("temperature", "must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "must be an integer >= 1, or -1 / 0 to disable")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1 (or None)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            fail("repetition_penalty", "must be > 0 (1 = off)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            fail("logprobs", "must be an integer >= 0 (or None)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            fail("seed", "must be a 64-bit integer, in [-2**63, 2**64 - 1] (or None)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            fail("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be a list of non-negative integers")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            fail("structured_outputs", "must be a StructuredOutputsParams (or None)")
        if not isinstance(self.output_kind, RequestOutputKind):
            fail("output_kind", "must be a RequestOutputKind")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a streamed output holds back until the request finishes: a stop
        string may be completed by a later token and then cut from the text, so its
        first len(stop) - 1 characters must not reach the client early."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def update_from_tokenizer(self, eos_token_ids) -> None:
        """Let the engine add the model's eos ids to the stop set (not when ignore_eos)."""
        self.all_stop_token_ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            self.all_stop_token_ids.update(int(t) for t in eos_token_ids)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
