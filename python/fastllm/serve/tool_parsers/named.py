"""A named tool choice: the grammar makes the whole output that function's arguments
object, so the output is one call of the named function."""
from __future__ import annotations

from fastllm.serve.tool_parsers.base import (CallDraft, MalformedCall, ToolParser,
                                             escape_control_chars, json_value_end, loads,
                                             skip_space)


class NamedFunctionParser(ToolParser):
    name = "named"

    def __init__(self, function_name: str):
        self.function_name = function_name

    def parse_calls(self, text: str) -> tuple[str, list]:
        pos = skip_space(text, 0)
        if pos == len(text):
            return "", [CallDraft(self.function_name)]
        if text[pos] != "{":
            raise MalformedCall("the output is not a JSON object")
        end = json_value_end(text, pos)
        if end is None:
            return "", [CallDraft(self.function_name, escape_control_chars(text[pos:]))]
        if skip_space(text, end) < len(text):
            raise MalformedCall("text after the arguments object")
        try:
            loads(text[pos:end])
        except json.JSONDecodeError as e:
            raise MalformedCall(f"the arguments are not valid JSON: {e}") from None
        return "", [CallDraft(self.function_name, escape_control_chars(text[pos:end]), True)]
