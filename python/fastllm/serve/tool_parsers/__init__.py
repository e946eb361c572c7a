"""Tool-call parsers, one per model format, and the registry the server picks from.

    parser = get_tool_parser("hermes")            # or detect_tool_parser(chat_template)
    parser.parse(text).calls                      # [CallDraft(name, arguments, done)]
"""
from __future__ import annotations

from typing import Optional, Union

from fastllm.serve.tool_parsers.base import CallDraft, ParsedOutput, ToolParser
from fastllm.serve.tool_parsers.hermes import HermesParser
from fastllm.serve.tool_parsers.json_array import JsonArrayParser
from fastllm.serve.tool_parsers.llama3_json import Llama3JsonParser
from fastllm.serve.tool_parsers.mistral import MistralParser
from fastllm.serve.tool_parsers.named import NamedFunctionParser
from fastllm.serve.tool_parsers.streaming import ToolCallStreamer, new_call_id

TOOL_PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}
AUTO = "auto"

# What each format's chat template writes, to pick a parser when none is named.
_TEMPLATE_MARKS = (("[TOOL_CALLS]", MistralParser), ("<tool_call>", HermesParser),
                   ("<|python_tag|>", Llama3JsonParser), ("<|eom_id|>", Llama3JsonParser))


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)} or "
                         f"{AUTO!r}, got {name!r}")
    return TOOL_PARSERS[name]()


def detect_tool_parser(chat_template: Union[str, dict, None]) -> ToolParser:
    """The parser whose format the template writes; hermes otherwise (the format the
    fallback tool prompt asks for)."""
    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template or ""]
    text = "\n".join(s for s in sources if isinstance(s, str))
    for mark, parser in _TEMPLATE_MARKS:
        if mark in text:
            return parser()
    return HermesParser()


def resolve_tool_parser(name: Optional[str], chat_template) -> ToolParser:
    if name is None or name == AUTO:
        return detect_tool_parser(chat_template)
    return get_tool_parser(name)


__all__ = ["AUTO", "CallDraft", "JsonArrayParser", "NamedFunctionParser", "ParsedOutput",
           "TOOL_PARSERS", "ToolCallStreamer", "ToolParser", "detect_tool_parser",
           "get_tool_parser", "new_call_id", "resolve_tool_parser"]
