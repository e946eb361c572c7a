"""Hermes / Qwen2.5 tool calls: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
one block per call; text before the first block is content (text after the last is
dropped, as the model's template never writes any)."""
from __future__ import annotations

from fastllm.serve.tool_parsers.base import (MalformedCall, ToolParser, held_back,
                                             parse_call_object, skip_space)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(ToolParser):
    name = "hermes"

    def parse_calls(self, text: str) -> tuple[str, list]:
        start = text.find(OPEN)
        if start < 0:
            return text[:held_back(text, [OPEN])], []
        calls, pos = [], start
        while pos < len(text) and text.startswith(OPEN, pos):
            pos = skip_space(text, pos + len(OPEN))
            if pos == len(text):
                break
            draft, end = parse_call_object(text, pos)
            calls.append(draft)
            if end is None:
                break
            pos = skip_space(text, end)
            if not text.startswith(CLOSE, pos):
                if CLOSE.startswith(text[pos:]):
                    break                      # the closing tag is still coming (or never did)
                raise MalformedCall(f"expected {CLOSE} after a call")
            pos = skip_space(text, pos + len(CLOSE))
        return text[:start], calls
