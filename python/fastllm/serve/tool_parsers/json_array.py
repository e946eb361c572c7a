"""Calls as a JSON array of call objects: `[{"name": ..., "arguments": {...}}, ...]`.

The shape the `required` tool choice's grammar produces (with "parameters"), and the
body of Mistral's `[TOOL_CALLS][...]`."""
from __future__ import annotations

from typing import Optional

from fastllm.serve.tool_parsers.base import MalformedCall, ToolParser, parse_call_object, skip_space


def parse_call_array(text: str, pos: int) -> tuple[list, Optional[int]]:
    """The call drafts of the array opening at text[pos] ('['), and the index past its
    ']' (None while open). MalformedCall when it holds anything but call objects."""
    if text[pos] != "[":
        raise MalformedCall(f"expected a JSON array of calls, got {text[pos]!r}")
    calls, pos = [], skip_space(text, pos + 1)
    while pos < len(text):
        if text[pos] == "]" and not calls:
            raise MalformedCall("the array of calls is empty")
        draft, end = parse_call_object(text, pos)
        calls.append(draft)
        if end is None:
            break
        pos = skip_space(text, end)
        if pos < len(text) and text[pos] == "]":
            return calls, pos + 1
        if pos < len(text):
            if text[pos] != ",":
                raise MalformedCall(f"expected ',' or ']' after a call, got {text[pos]!r}")
            pos = skip_space(text, pos + 1)
    return calls, None


class JsonArrayParser(ToolParser):
    """The whole output is the array (whitespace around it allowed)."""
    name = "json_array"

    def parse_calls(self, text: str) -> tuple[str, list]:
        pos = skip_space(text, 0)
        if pos == len(text):
            return "", []
        calls, end = parse_call_array(text, pos)
        if end is not None and skip_space(text, end) < len(text):
            raise MalformedCall("text after the array of calls")
        return "", calls
