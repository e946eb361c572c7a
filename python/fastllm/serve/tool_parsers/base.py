"""What every tool-call parser shares: drafts of calls as far as the text goes, a JSON
scanner that finds where a value ends in a partial text, and one call object's parse.

A parser reads the whole text generated so far (`parse(text, final)`), so the
streaming and the final answers come from one function: the final calls are the drafts
of the last partial parse completed, never a second interpretation. Arguments are the
raw text of the model's arguments object (valid JSON, checked), as OpenAI returns them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

# The call header that lets a call stream: the name first, then its arguments object.
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class CallDraft:
    """One tool call as far as the text goes: name None until known; arguments the
    raw arguments text so far (the whole JSON text once done)."""
    name: Optional[str] = None
    arguments: str = ""
    done: bool = False


@dataclass
class ParsedOutput:
    """content: the text that is plain content (so far); calls: the tool calls (drafts
    while not final). A malformed call makes the whole text content (calls empty)."""
    content: str
    calls: list = field(default_factory=list)


def json_value_end(text: str, pos: int) -> Optional[int]:
    """The index just past the JSON object or array opening at text[pos], or None while
    the text ends inside it. Strings and escapes are honoured; validity is json's job."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class MalformedCall(ValueError):
    pass


def escape_control_chars(raw: str) -> str:
    """raw JSON text with control characters inside strings escaped (\\u00XX), which
    strict JSON readers (json.loads, OpenAI clients) require and grammar-constrained
    output does not always give. Character by character, so a prefix maps to a prefix
    and streamed fragments still add up to the final arguments."""
    out, in_string, escaped = [], False, False
    for ch in raw:
        if in_string and not escaped and ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
            continue
        out.append(ch)
        if escaped:
            escaped = False
        elif in_string and ch == "\\":
            escaped = True
        elif ch == '"':
            in_string = not in_string
    return "".join(out)


def loads(text: str):
    """json.loads, accepting raw control characters in strings (escaped on the way out)."""
    return json.loads(text, strict=False)


def _arguments_text(value) -> str:
    """Arguments given other than as an object: a JSON string holding an object, or
    none at all ({})."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            decoded = loads(value)
        except json.JSONDecodeError:
            raise MalformedCall("arguments is a string that is not JSON") from None
        if not isinstance(decoded, dict):
            raise MalformedCall("arguments is not a JSON object")
        return value
    raise MalformedCall("arguments is not a JSON object")


def parse_call_object(text: str, pos: int) -> tuple[CallDraft, Optional[int]]:
    """The call object {"name": ..., "arguments"|"parameters": {...}} opening at
    text[pos]: (its draft, the index past it or None while incomplete). MalformedCall
    when the complete object is not a call."""
    if text[pos] != "{":
        raise MalformedCall(f"expected a JSON object, got {text[pos]!r}")
    end = json_value_end(text, pos)
    header = _HEADER.match(text, pos)
    streamable = header is not None and text.startswith("{", header.end())
    if end is None:
        if not streamable:
            return CallDraft(), None
        args_end = json_value_end(text, header.end())
        return CallDraft(loads(f'"{header.group(1)}"'),
                         escape_control_chars(text[header.end():args_end or len(text)])), None
    try:
        obj = loads(text[pos:end])
    except json.JSONDecodeError as e:
        raise MalformedCall(f"the call is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise MalformedCall("the call has no string 'name'")
    key = next((k for k in _ARGUMENT_KEYS if k in obj), None)
    value = obj.get(key) if key else None
    if isinstance(value, dict):
        args = escape_control_chars(text[header.end():json_value_end(text, header.end())]) \
            if streamable else json.dumps(value, ensure_ascii=False)
    else:
        args = _arguments_text(value)
    return CallDraft(obj["name"], args, True), end


def skip_space(text: str, pos: int, extra: str = "") -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] in extra):
        pos += 1
    return pos


def held_back(text: str, markers) -> int:
    """Where content must stop so that no start of a marker goes out as content: the
    start of the longest suffix of text that is a proper prefix of a marker."""
    for start in range(max(0, len(text) - max(len(m) for m in markers) + 1), len(text)):
        if any(m.startswith(text[start:]) for m in markers):
            return start
    return len(text)


class ToolParser:
    """A format's parser. Subclasses give `name`, `parse_calls`; `needs_special_tokens`
    when their markers are special tokens the detokenizer would otherwise drop."""
    name = ""
    needs_special_tokens = False

    def parse(self, text: str, final: bool = True) -> ParsedOutput:
        """Content and calls of `text` (all generated so far). final: the text is
        complete; an unfinished or malformed call makes it all content."""
        try:
            content, calls = self.parse_calls(text)
        except MalformedCall:
            return ParsedOutput(text)
        if final and (not calls or not all(c.done for c in calls)):
            return ParsedOutput(text)
        return ParsedOutput(content, calls)

    def parse_calls(self, text: str) -> tuple[str, list]:
        """(content before the calls, call drafts); MalformedCall when not calls."""
        raise NotImplementedError
