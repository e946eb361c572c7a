"""A chat request's tools and tool_choice -> ToolPlan: which parser reads `auto` (the
--tool-call-parser flag, else the template's format), which JSON schema constrains
`required` / named choices, and 400s naming the field."""
from __future__ import annotations

import jsonschema
import pytest

from templates import BOUNDED_TOOLS, HERMES_TOOLS, LLAMA3_TOOLS
from fastllm.serve.errors import APIError
from fastllm.serve.protocol import ChatCompletionRequest
from fastllm.serve.tools import plan_tools

ASK = [{"role": "user", "content": "Hi"}]
WEATHER_CALL = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}
SEARCH_CALL = {"name": "search", "parameters": {"query": "x", "tags": [], "exact": True}}


def plan(flag=None, template=HERMES_TOOLS, **fields):
    req = ChatCompletionRequest.model_validate({"messages": ASK, "tools": BOUNDED_TOOLS, **fields})
    return plan_tools(req, flag, template)


def test_auto_parser_from_the_flag_or_the_template():
    assert plan().mode == "auto" and plan().parser.name == "hermes"
    assert plan(template=LLAMA3_TOOLS).parser.name == "llama3_json"
    assert plan("mistral", template=LLAMA3_TOOLS).parser.name == "mistral"
    assert plan("auto", template=LLAMA3_TOOLS).parser.name == "llama3_json"
    single = plan(parallel_tool_calls=False).parser
    text = "".join(f'<tool_call>{{"name": "{n}", "arguments": {{}}}}</tool_call>' for n in "ab")
    assert [c.name for c in single.parse(text).calls] == ["a"]
    none = plan(tool_choice="none")
    assert none.mode == "none" and none.parser is None and none.schema is None


def test_required_schema_accepts_calls_and_refuses_others():
    schema = plan(tool_choice="required").schema
    jsonschema.validate([WEATHER_CALL], schema)
    jsonschema.validate([WEATHER_CALL, SEARCH_CALL], schema)
    for bad in ([], [{"name": "search", "parameters": WEATHER_CALL["parameters"]}],
                [{"name": "nope", "parameters": {}}], [{"parameters": {}}], WEATHER_CALL):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = plan(tool_choice="required", parallel_tool_calls=False).schema
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([WEATHER_CALL, SEARCH_CALL], one)


def test_named_schema_is_the_functions_parameters():
    named = plan(tool_choice={"type": "function", "function": {"name": "search"}})
    assert named.mode == "named" and named.schema == BOUNDED_TOOLS[1]["function"]["parameters"]
    assert named.parser.parse('{"query": "x", "tags": [], "exact": true}').calls[0].name == "search"


@pytest.mark.parametrize("fields,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice"),
])
def test_bad_plans_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        plan(**fields)
    assert e.value.param == param and e.value.status == 400
