"""Mistral tool calls after the `[TOOL_CALLS]` token: a JSON array of call objects
(v3 tokenizers), or `name[ARGS]{...}` per call, each after its own `[TOOL_CALLS]`
(v11+). Text before the first marker is content."""
from __future__ import annotations

from fastllm.serve.tool_parsers.base import (CallDraft, MalformedCall, ToolParser,
                                             escape_control_chars, held_back, json_value_end,
                                             loads, skip_space)
from fastllm.serve.tool_parsers.json_array import parse_call_array

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True          # [TOOL_CALLS] is a control token

    def parse_calls(self, text: str) -> tuple[str, list]:
        start = text.find(TOOL_CALLS)
        if start < 0:
            return text[:held_back(text, [TOOL_CALLS])], []
        pos = skip_space(text, start + len(TOOL_CALLS))
        if pos == len(text):
            return text[:start], []
        if text[pos] == "[":
            return text[:start], parse_call_array(text, pos)[0]
        return text[:start], _named_calls(text, start)


def _named_calls(text: str, pos: int) -> list:
    """`[TOOL_CALLS]name[ARGS]{...}` repeated, from text[pos] (a marker)."""
    calls = []
    while text.startswith(TOOL_CALLS, pos):
        pos += len(TOOL_CALLS)
        args_at = text.find(ARGS, pos)
        if args_at < 0:                  # the name is still coming
            calls.append(CallDraft())
            return calls
        name, pos = text[pos:args_at].strip(), skip_space(text, args_at + len(ARGS))
        if not name:
            raise MalformedCall("a call without a function name")
        if pos == len(text):
            calls.append(CallDraft(name))
            return calls
        if text[pos] != "{":
            raise MalformedCall("the arguments are not a JSON object")
        end = json_value_end(text, pos)
        calls.append(CallDraft(name, escape_control_chars(text[pos:end or len(text)]),
                             end is not None))
        if end is None:
            return calls
        try:
            loads(text[pos:end])
        except json.JSONDecodeError as e:
            raise MalformedCall(f"the arguments are not valid JSON: {e}") from None
        pos = skip_space(text, end)
    if pos < len(text) and not TOOL_CALLS.startswith(text[pos:]):
        raise MalformedCall("text after a call")
    return calls
