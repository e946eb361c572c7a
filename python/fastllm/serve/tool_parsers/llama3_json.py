"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole output,
possibly after `<|python_tag|>` (text before the tag is content); several calls are
separated by ';'."""
from __future__ import annotations

from fastllm.serve.tool_parsers.base import (MalformedCall, ToolParser, held_back,
                                             parse_call_object, skip_space)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True          # <|python_tag|> is a special token

    def parse_calls(self, text: str) -> tuple[str, list]:
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            content, pos = text[:tag], skip_space(text, tag + len(PYTHON_TAG))
        else:
            pos = skip_space(text, 0)
            if pos < len(text) and text[pos] != "{":
                return text[:held_back(text, [PYTHON_TAG])], []
            content = ""
        calls = []
        while pos < len(text):
            draft, end = parse_call_object(text, pos)
            calls.append(draft)
            if end is None:
                break
            pos = skip_space(text, end, ";")
            if pos < len(text) and text[pos] != "{":
                raise MalformedCall("text after a call")
        return content, calls
