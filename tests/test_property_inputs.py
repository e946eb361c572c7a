"""Property tests (hypothesis): whatever a client sends as SamplingParams fields or chat
messages either works -- and gives a sensible result -- or raises ValueError / TypeError
naming the field. Never another exception type."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from checkpoints import CHAT_TEMPLATE, cached_checkpoint
from fastllm.model.sampler import Sampler, SamplingBatch, make_generator
from fastllm.sampling_params import MAX_N, SamplingParams
from fastllm.tokenizer import Tokenizer

V, VALID = 64, 61            # logits columns; ids the (imagined) tokenizer knows

# Values a careless or hostile client might put in any field.
ints = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64,
                                                        -(2**63) - 1, 10**30, MAX_N, MAX_N + 1]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, 1e-50, 1e-45, 1e-6, 0.5, 1.0, 2.0, 1e30]))
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.binary(max_size=2),
                 st.lists(st.integers(-2, 70), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
anything = st.one_of(ints, floats, junk)
# Per field: what a well-behaved client sends. Each drawn field is, one time in six,
# replaced by `anything` instead.
FIELDS = {
    "n": st.integers(1, 3),
    "temperature": st.one_of(st.floats(0, 5), st.sampled_from([0.0, 1e-6, 1e-4, 1e30])),
    "top_p": st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([1e-50, 1e-45, 1.0])),
    "top_k": st.integers(-1, 70),
    "min_p": st.floats(0, 1),
    "max_tokens": st.one_of(st.none(), st.integers(1, 50)),
    "min_tokens": st.integers(0, 5),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 70), max_size=3),
    "ignore_eos": st.booleans(),
    "seed": st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)),
    "skip_special_tokens": st.booleans(),
}


def maybe_hostile(strategy):
    return st.integers(0, 5).flatmap(lambda roll: anything if roll == 0 else strategy)


@st.composite
def sampling_kwargs(draw):
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=6))
    return {name: draw(maybe_hostile(FIELDS[name])) for name in names}


def _check_sensible(p: SamplingParams) -> None:
    assert 1 <= p.n <= MAX_N
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        assert math.isfinite(getattr(p, name)), name
    assert p.temperature >= 0 and 0 < p.top_p <= 1 and 0 <= p.min_p <= 1
    assert all(isinstance(s, str) and s for s in p.stop)
    assert all(isinstance(t, int) and 0 <= t < 2**63 for t in p.stop_token_ids)
    assert p.seed is None or -(2**63) <= p.seed < 2**64


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=sampling_kwargs(), data=st.data())
def test_sampling_params_run_or_name_the_field(kwargs, data):
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(f"SamplingParams.{name}" in str(e) for name in kwargs), (kwargs, e)
        return
    _check_sensible(params)
    # And it samples: one step of a batch of these rows, ids inside the valid vocabulary.
    params.update_from_tokenizer([2])
    rows = 3
    outputs = [data.draw(st.lists(st.integers(0, VALID - 1), max_size=4)) for _ in range(rows)]
    batch = SamplingBatch.from_requests([params] * rows, [make_generator(params, "cpu") for _ in range(rows)],
                                        [[1, 5, 9]] * rows, outputs, "cpu", vocab_size=V)
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(0)) * 4
    out = Sampler(valid_vocab_size=VALID)(logits, batch)
    ids = out.sampled_token_ids
    assert ids.shape == (rows,) and 0 <= int(ids.min()) and int(ids.max()) < VALID
    if params.logprobs is not None:
        assert torch.isfinite(out.sampled_logprobs).all()


# ------------------------------------------------------------------ chat messages
roles = maybe_hostile(st.sampled_from(["user", "assistant", "system", "tool"]))
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=6)})
odd_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text", 3]),
                                  "text": st.one_of(st.text(max_size=3), junk)})
parts = maybe_hostile(st.one_of(text_part, text_part, odd_part))
contents = maybe_hostile(st.one_of(st.text(max_size=8), st.none(), st.lists(parts, max_size=3)))
message = maybe_hostile(st.one_of(st.fixed_dictionaries({"role": roles, "content": contents}),
                                  st.fixed_dictionaries({"role": roles})))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(cached_checkpoint("llama"))


def _chatml(messages) -> str:
    """The test template (ChatML) by hand, on vLLM's content rules."""
    def text(content):
        if content is None:
            return ""
        return content if isinstance(content, str) else "\n".join(p["text"] for p in content)
    return "".join(f"<|im_start|>{m['role']}\n{text(m.get('content', ''))}<|im_end|>\n"
                   for m in messages) + "<|im_start|>assistant\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=maybe_hostile(st.lists(message, max_size=4)))
def test_chat_messages_render_or_name_the_message(tokenizer, messages):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (ValueError, TypeError) as e:
        assert "messages" in str(e), (messages, e)
        return
    assert text == _chatml(messages)
    ids = tokenizer.apply_chat_template(messages)
    assert all(0 <= t < tokenizer.vocab_size for t in ids)
