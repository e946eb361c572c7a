"""Structured outputs end to end on a random-weight Llama (whose free output is garbage):
every constrained output parses / matches, under sampling, n > 1, a mixed batch and a
KV cache small enough to preempt. References: jsonschema, re.fullmatch, json.loads."""
from __future__ import annotations

import json
import re
import threading

import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams, StructuredOutputsParams

from schemas import COLORS, ITEMS_SCHEMA, PERSON_SCHEMA, PRICE_REGEX

jsonschema = pytest.importorskip("jsonschema")

PROMPTS = ["Hello world", "The capital of France", "Once upon a time", "count: one, two"]


@pytest.fixture(scope="module")
def model_path():
    return cached_checkpoint("llama")


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(str(model_path), device="cpu", max_model_len=256, num_kv_blocks=256)


def _json(schema, **kw):
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True, **kw)


def _sampled(structured, n=1, max_tokens=200):
    """Greedy and three seeded temperatures, one per prompt."""
    return [SamplingParams(temperature=t, seed=s, n=n, max_tokens=max_tokens, structured_outputs=structured)
            for t, s in ((0.0, None), (1.0, 1), (0.7, 2), (1.3, 3))]


def _texts(outs):
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


@pytest.mark.parametrize("schema", [PERSON_SCHEMA, ITEMS_SCHEMA], ids=["nested-object", "array"])
def test_json_schema_outputs_validate(llm, schema):
    outs = llm.generate(PROMPTS, _sampled(_json(schema)), use_tqdm=False)
    for text, reason in _texts(outs):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_with_free_whitespace_and_schema_text(llm):
    # The schema as JSON text, whitespace allowed: a shorter schema so the weak model closes it.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    outs = llm.generate(PROMPTS, _sampled(StructuredOutputsParams(json=json.dumps(schema))), use_tqdm=False)
    for text, reason in _texts(outs):
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        else:      # whitespace ran to max_tokens: still a prefix of a valid document
            assert reason == "length" and text.lstrip().startswith("{")


def test_regex_choice_grammar_json_object(llm):
    cases = [
        (StructuredOutputsParams(regex=PRICE_REGEX), lambda t: re.fullmatch(PRICE_REGEX, t)),
        (StructuredOutputsParams(choice=COLORS), lambda t: t in COLORS),
        (StructuredOutputsParams(grammar='root ::= "x=" [0-9] [0-9]? ";" ("y" | "z")'),
         lambda t: re.fullmatch(r"x=[0-9][0-9]?;[yz]", t)),
        (StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
         lambda t: isinstance(json.loads(t), dict)),
    ]
    for structured, check in cases:
        outs = llm.generate(PROMPTS, _sampled(structured), use_tqdm=False)
        for text, reason in _texts(outs):
            assert reason == "stop" and check(text), (structured.kind, text)


def test_n_samples_each_follow_the_grammar(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=200, structured_outputs=_json(PERSON_SCHEMA))
    out = llm.generate(["Hi"], params, use_tqdm=False)[0]
    assert len(out.outputs) == 3
    docs = [json.loads(c.text) for c in out.outputs]
    for doc in docs:
        jsonschema.validate(doc, PERSON_SCHEMA)
    assert len({json.dumps(d) for d in docs}) > 1     # forked matchers, not one shared state


def test_mixed_batch_leaves_unconstrained_requests_unchanged(llm):
    free = [SamplingParams(temperature=0, max_tokens=24), SamplingParams(temperature=0.9, seed=11, max_tokens=24)]
    alone = llm.generate(PROMPTS[:2], free, use_tqdm=False)
    constrained = _sampled(_json(PERSON_SCHEMA))[:2] + [SamplingParams(max_tokens=50, structured_outputs=
                                                                       StructuredOutputsParams(regex=PRICE_REGEX))]
    mixed = llm.generate(PROMPTS[2:] + PROMPTS[:2] + ["x"], constrained[:2] + free + constrained[2:],
                         use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[2:4]] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[0].outputs[0].text), PERSON_SCHEMA)


def test_max_tokens_cuts_the_output_with_length(llm):
    out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=4, structured_outputs=_json(PERSON_SCHEMA)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith('{"')
    with pytest.raises(ValueError):
        json.loads(out.text)


@pytest.mark.parametrize("swap_space", [0, 0.002], ids=["recompute", "swap"])
def test_preempted_requests_stay_valid_and_free_their_blocks(model_path, swap_space):
    # 6 requests of up to ~60 tokens on 8 blocks of 16 slots: preemption is certain.
    llm = LLM(str(model_path), device="cpu", max_model_len=256, num_kv_blocks=8, swap_space=swap_space)
    params = [SamplingParams(temperature=t, seed=s, max_tokens=100, structured_outputs=_json(ITEMS_SCHEMA))
              for t, s in ((0.0, None), (1.0, 1), (0.7, 2))] * 2
    outs = llm.generate(PROMPTS[:3] * 2, params, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    if swap_space:
        assert stats.num_swaps_out > 0
    for text, reason in _texts(outs):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), ITEMS_SCHEMA)
    assert llm.llm_engine.block_manager.num_used_blocks == 0
    llm.llm_engine.close()


@pytest.mark.parametrize("structured, field, why", [
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "json", "nope"),
    (StructuredOutputsParams(json='{"type": "object",'), "json", "not valid JSON"),
    (StructuredOutputsParams(json="[1, 2]"), "json", "schema object"),
    (StructuredOutputsParams(json={"$ref": "#/definitions/missing"}), "json", "missing"),
    (StructuredOutputsParams(regex="(ab"), "regex", "parenthesis"),
    (StructuredOutputsParams(grammar="root ::= undefined_rule"), "grammar", "undefined_rule"),
    (StructuredOutputsParams(grammar='start: "a"'), "grammar", ""),
])
def test_invalid_constraints_raise_at_add_request(llm, structured, field, why):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=rf"StructuredOutputsParams\.{field}.*{re.escape(why)}"):
        engine.add_request("bad", "Hi", SamplingParams(structured_outputs=structured))
    assert not engine.has_unfinished_requests()


def test_a_compiling_grammar_does_not_stall_other_requests(llm, monkeypatch):
    engine = llm.llm_engine
    manager = engine.structured
    release = threading.Event()
    compile_now = manager._compile
    monkeypatch.setattr(manager, "_compile", lambda grammar: (release.wait(60), compile_now(grammar))[1])
    fresh = {"type": "object", "properties": {"zz": {"enum": [1, 2]}}, "required": ["zz"]}
    engine.add_request("slow", "Hi", SamplingParams(temperature=0, max_tokens=40, structured_outputs=_json(fresh)))
    engine.add_request("free", "Hi", SamplingParams(temperature=0, max_tokens=5))
    finished = {}
    for _ in range(20):                      # the free request runs to its end meanwhile
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "free" in finished:
            break
    assert "free" in finished and "slow" not in finished
    assert engine.has_unfinished_requests()
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    jsonschema.validate(json.loads(finished["slow"].outputs[0].text), fresh)
    # Compiled once per key: a second submit shares the future.
    a, b = manager.submit(_json(fresh)), manager.submit(_json(fresh))
    assert a.future is b.future and a.is_ready


def test_min_tokens_past_a_complete_grammar_stops_there(llm):
    # The grammar is complete after "yes" and allows only eos, which min_tokens bans: the
    # sampler has nothing left, and the request stops with its complete output.
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["yes"]))
    out = llm.generate(["Hi"], params, use_tqdm=False)[0].outputs[0]
    assert out.text == "yes" and out.finish_reason == "stop"


def test_a_grammar_that_fails_to_compile_aborts_only_its_request(llm, monkeypatch):
    manager = llm.llm_engine.structured

    def out_of_memory(grammar):
        raise MemoryError("no room for the token masks")
    monkeypatch.setattr(manager, "_compile", out_of_memory)
    doomed = {"type": "object", "properties": {"never": {"type": "null"}}, "required": ["never"]}
    outs = llm.generate(["Hi", "Hello"], [SamplingParams(max_tokens=5, structured_outputs=_json(doomed)),
                                          SamplingParams(temperature=0, max_tokens=5)], use_tqdm=False)
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].token_ids == []
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 5
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.block_manager.num_used_blocks == 0
