"""Tool calling on the chat endpoint: a request's `tools` / `tool_choice` checked and
turned into a ToolPlan (what goes to the template, which grammar constrains the output,
which parser reads it back), and parsed outputs into OpenAI's `tool_calls`.

    auto      the model may call: its output is parsed in its template's format
    required  a JSON-schema grammar: an array of {"name", "parameters"} over the tools
    named     a JSON-schema grammar: that function's arguments object
    none      no calls: the output is content
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import jsonschema

from fastllm.serve.errors import APIError
from fastllm.serve.protocol import FunctionCall, ToolCall
from fastllm.serve.tool_parsers import (JsonArrayParser, NamedFunctionParser, ParsedOutput,
                                        ToolParser, new_call_id, resolve_tool_parser)

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FirstCallOnly(ToolParser):
    """parallel_tool_calls: false under `auto`: the first call is the answer."""

    def __init__(self, inner: ToolParser):
        self.inner, self.name = inner, inner.name
        self.needs_special_tokens = inner.needs_special_tokens

    def parse(self, text: str, final: bool = True) -> ParsedOutput:
        parsed = self.inner.parse(text, final)
        return ParsedOutput(parsed.content, parsed.calls[:1])


@dataclass
class ToolPlan:
    tools: list                  # OpenAI function specs, as the template takes them
    mode: str                    # "none" | "auto" | "required" | "named"
    parser: Optional[ToolParser]  # None under "none"
    schema: Optional[dict]       # the grammar's JSON schema under "required" / "named"


def plan_tools(req, parser_name: Optional[str], chat_template) -> Optional[ToolPlan]:
    """The request's ToolPlan, or None when it has no tools. APIError (400) naming the
    field for malformed tools or a tool_choice they cannot satisfy."""
    choice = req.tool_choice
    if not req.tools:
        if req.tools is not None:
            raise APIError("tools must not be empty (leave it out for no tools)", param="tools")
        if choice is not None and choice != "none":
            raise APIError("tool_choice needs tools", param="tool_choice")
        return None
    tools = [_checked_tool(i, t) for i, t in enumerate(req.tools)]
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if len(functions) != len(tools):
        raise APIError("tools holds two functions of the same name", param="tools")
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        parser = resolve_tool_parser(parser_name, chat_template)
        return ToolPlan(tools, "auto", parser if parallel else FirstCallOnly(parser), None)
    if choice == "none":
        return ToolPlan(tools, "none", None, None)
    if choice == "required":
        return ToolPlan(tools, "required", JsonArrayParser(),
                        required_schema(list(functions.values()), parallel))
    name = choice.function.name
    if name not in functions:
        raise APIError(f"tool_choice names the function {name!r}, which is not in tools "
                       f"({sorted(functions)})", param="tool_choice")
    return ToolPlan(tools, "named", NamedFunctionParser(name), functions[name]["parameters"])


def _checked_tool(index: int, tool) -> dict:
    where = f"tools.{index}.function"
    function = tool.function
    if not _NAME.fullmatch(function.name):
        raise APIError(f"{where}.name must be 1-64 of [A-Za-z0-9_-], got {function.name!r}",
                       param=f"{where}.name")
    parameters = function.parameters
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as e:
        raise APIError(f"{where}.parameters is not a valid JSON schema: {e.message}",
                       param=f"{where}.parameters") from None
    if parameters.get("type", "object") != "object":
        raise APIError(f"{where}.parameters must describe an object (type 'object'), got "
                       f"type {parameters.get('type')!r}", param=f"{where}.parameters")
    spec = {"name": function.name, "parameters": parameters}
    if function.description is not None:
        spec["description"] = function.description
    return {"type": "function", "function": spec}


def required_schema(functions: list, parallel: bool) -> dict:
    """An array of at least one call, each {"name": one of the tools, "parameters": its
    arguments}; name first so the call streams."""
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [f["name"]]},
                             "parameters": f["parameters"]},
              "required": ["name", "parameters"], "additionalProperties": False}
             for f in functions]
    schema = {"type": "array", "minItems": 1,
              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_constraint(params, schema: dict):
    """params with the JSON-schema grammar of a required / named tool choice."""
    try:
        from fastllm.sampling_params import StructuredOutputsParams
    except ImportError:
        raise APIError("tool_choice 'required' or a named function needs structured outputs, "
                       "which this build lacks", 501, param="tool_choice") from None
    if getattr(params, "structured_outputs", None) is not None:
        raise APIError("tool_choice 'required' or a named function cannot be combined with "
                       "response_format / structured_outputs", param="tool_choice")
    # Compact JSON: a weak model cannot wander in whitespace until max_tokens.
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    return dataclasses.replace(params, structured_outputs=constraint)


def tool_calls_out(parsed: ParsedOutput) -> list[ToolCall]:
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in parsed.calls]
