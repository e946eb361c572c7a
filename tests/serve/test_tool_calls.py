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
from templates import SEARCH_TOOL, WEATHER_TOOL  # noqa: E402

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
