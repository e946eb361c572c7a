"""Tool calling on /v1/chat/completions against the official openai client, on the tiny
random-weight checkpoint: required and named choices give arguments that always parse
and validate (jsonschema) against the tool's parameters, streaming too; `auto` with the
output forced into a Hermes call (a structured-outputs regex) ends as tool_calls; bad
tools and tool choices get 400 naming the field."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest

from checkpoints import cached_checkpoint
from server_process import MODEL_NAME, ServerProcess

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from templates import (BOUNDED_TOOLS, CONVERSATION, HERMES_TOOLS, SEARCH_TOOL,  # noqa: E402
                       WEATHER_TOOL)

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
OK = {"model": MODEL_NAME, "messages": ASK, "max_tokens": 4}

TOOL_MODEL_LEN = 2048           # the tool schemas alone are ~800 tokens of the tiny vocabulary


@pytest.fixture(scope="module")
def tool_server():
    path = cached_checkpoint("llama", max_position_embeddings=TOOL_MODEL_LEN)
    proc = ServerProcess(path, "--num-kv-blocks", 512, "--max-model-len", TOOL_MODEL_LEN)
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def tool_client(tool_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)


BAD = [
    ({"tool_choice": "required"}, "tool_choice"),                        # choice without tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {          # the grammar
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"messages": ASK + [{"role": "tool", "content": "21C"}]}, "messages.1.tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_tools_get_400_naming_the_field(tool_server, extra, param):
    r = httpx.post(tool_server.url + "/v1/chat/completions", json={**OK, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_tool_messages_are_rendered(tool_client, hf_tokenizer):
    """An earlier call and its result go through the template (here the fallback tool
    prompt: the tiny template takes no tools): the prompt grows by exactly their text."""
    from fastllm.tokenizer.tool_prompt import with_tool_prompt
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "21C and sunny"}]
    resp = tool_client.chat.completions.create(model=MODEL_NAME, messages=history, tools=TOOLS,
                                          max_tokens=2, tool_choice="none")
    as_text = with_tool_prompt([{**m, "content": m["content"] or ""} for m in history], TOOLS)
    expected = hf_tokenizer.apply_chat_template(as_text, add_generation_prompt=True,
                                                tokenize=False)
    assert '"arguments": {"city": "Paris", "unit": "c"}' in expected
    assert "<tool_response>\n21C and sunny\n</tool_response>" in expected
    assert resp.usage.prompt_tokens == len(hf_tokenizer.encode(expected, add_special_tokens=False))
    assert resp.choices[0].message.tool_calls is None


def test_auto_on_free_text_is_content(tool_client):
    resp = tool_client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS,
                                          max_tokens=8, temperature=0)
    choice = resp.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    plain = tool_client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=8,
                                           temperature=0)
    assert resp.usage.prompt_tokens > plain.usage.prompt_tokens       # the tools were in it


# -- required / named: enforced by a JSON-schema grammar (structured outputs) ------------

BOUNDED = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}
NAMED_SEARCH = {"type": "function", "function": {"name": "search"}}


def assert_valid_calls(calls, names=None):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or BOUNDED)
        jsonschema.validate(json.loads(call.function.arguments), BOUNDED[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def create(client, **kw):
    return client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=BOUNDED_TOOLS,
                                          max_tokens=400, temperature=1.0, **kw)


@pytest.mark.parametrize("choice", ["required", NAMED_SEARCH], ids=["required", "named"])
def test_forced_choices_give_valid_arguments(tool_client, choice):
    seen = set()
    for seed in range(3):
        resp = create(tool_client, tool_choice=choice, n=3, seed=seed, parallel_tool_calls=False)
        for c in resp.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            assert_valid_calls(c.message.tool_calls,
                               ["search"] if choice is NAMED_SEARCH else None)
            if choice is NAMED_SEARCH:
                assert len(c.message.tool_calls) == 1
            seen.update(json.dumps(json.loads(t.function.arguments), sort_keys=True)
                        for t in c.message.tool_calls)
    assert len(seen) > 3                     # sampled, not one fixed answer


def test_required_without_parallel_calls_is_one_call(tool_client):
    for seed in range(3):
        resp = create(tool_client, tool_choice="required", parallel_tool_calls=False, seed=seed)
        assert len(resp.choices[0].message.tool_calls) == 1
        assert_valid_calls(resp.choices[0].message.tool_calls)


def streamed_calls(client, **kw):
    """(content, [(id, name, arguments)], finish_reason) from a stream's deltas; checks
    OpenAI's order: a call's index, id, type and name on its first delta only."""
    content, calls, finish = "", {}, None
    for chunk in create(client, stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                if t.index not in calls:
                    assert t.id and t.type == "function" and t.function.name
                    assert t.index == len(calls)
                    calls[t.index] = [t.id, t.function.name, t.function.arguments or ""]
                else:
                    assert t.id is None and t.function.name is None
                    calls[t.index][2] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [tuple(v) for v in calls.values()], finish


@pytest.mark.parametrize("choice", ["required", NAMED_SEARCH], ids=["required", "named"])
def test_streamed_forced_calls_equal_non_streamed(tool_client, choice):
    for seed in (11, 12):
        whole = create(tool_client, tool_choice=choice, seed=seed).choices[0].message.tool_calls
        content, calls, finish = streamed_calls(tool_client, tool_choice=choice, seed=seed)
        assert content == "" and finish == "tool_calls"
        assert [(n, a) for _, n, a in calls] == [(t.function.name, t.function.arguments)
                                                for t in whole]


# -- auto: the model's own output parsed; forced here to a known Hermes call -------------

def hermes_call(name, arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


FORCED = "Let me check.\n" + hermes_call("get_weather", {"city": "Paris", "unit": "c"}) + "\n" \
    + hermes_call("search", {"query": "rain", "tags": ["news"], "exact": False})


def _server_takes_structured_outputs() -> bool:
    from fastllm.serve.protocol import ChatCompletionRequest
    return "structured_outputs" in ChatCompletionRequest.model_fields


@pytest.mark.skipif(not _server_takes_structured_outputs(),
                    reason="the server's structured_outputs field is not merged yet")
def test_auto_parses_a_forced_hermes_output(tool_client):
    body = {"structured_outputs": {"choice": [FORCED]}}
    resp = create(tool_client, tool_choice="auto", extra_body=body)
    message = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "c"}),
         ("search", {"query": "rain", "tags": ["news"], "exact": False})]
    assert_valid_calls(message.tool_calls)
    content, calls, finish = streamed_calls(tool_client, extra_body=body)
    assert content == "Let me check.\n" and finish == "tool_calls"
    assert [(n, a) for _, n, a in calls] == [(t.function.name, t.function.arguments)
                                            for t in message.tool_calls]
    one = create(tool_client, parallel_tool_calls=False, extra_body=body).choices[0].message
    assert [t.function.name for t in one.tool_calls] == ["get_weather"]
    none = create(tool_client, tool_choice="none", extra_body=body).choices[0]
    assert none.message.content == FORCED and none.message.tool_calls is None
    assert none.finish_reason == "stop"


@pytest.mark.skipif(not _server_takes_structured_outputs(),
                    reason="the server's response_format field is not merged yet")
def test_forced_choice_with_response_format_is_400(tool_server):
    r = httpx.post(tool_server.url + "/v1/chat/completions", timeout=30, json={
        **OK, "tools": BOUNDED_TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text


def test_offline_chat_renders_tools_as_transformers_does(hf_tokenizer):
    from fastllm import LLM, SamplingParams
    llm = LLM(str(cached_checkpoint("llama", max_position_embeddings=TOOL_MODEL_LEN)),
              device="cpu", max_model_len=TOOL_MODEL_LEN, num_kv_blocks=128)
    out = llm.chat(CONVERSATION, SamplingParams(max_tokens=1), use_tqdm=False, tools=TOOLS,
                   chat_template=HERMES_TOOLS)[0]
    expected = hf_tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS,
                                                chat_template=HERMES_TOOLS,
                                                add_generation_prompt=True, tokenize=False)
    assert "<tool_response>" in expected and "get_weather" in expected
    assert out.prompt_token_ids == hf_tokenizer.encode(expected, add_special_tokens=False)
