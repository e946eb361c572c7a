"""Each tool-call parser against samples written in its model's format (built here with
json.dumps, the independent reference for the arguments), and the streaming parser
against the final one on the same text, fed in pieces of every size."""
from __future__ import annotations

import json
import random

import pytest

from fastllm.serve.tool_parsers import (JsonArrayParser, NamedFunctionParser, ToolCallStreamer,
                                        detect_tool_parser, get_tool_parser)

WEATHER = ("get_weather", {"city": "Paris \"Île\"", "days": [1, 2, {"unit": "}c]"}]})
SEARCH = ("search", {"query": "tool {calls} <tool_call>", "limit": 3, "exact": True})
NO_ARGS = ("now", {})
CALLS = [WEATHER, SEARCH, NO_ARGS]


def hermes(calls, before=""):
    return before + "".join(
        f'<tool_call>\n{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}\n</tool_call>\n'
        for n, a in calls)


def llama3(calls, before="", tag=True):
    body = "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)
    return before + ("<|python_tag|>" if tag else "") + body


def mistral_v3(calls, before=""):
    return before + "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in calls])


def mistral_v11(calls, before=""):
    return before + "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)


FORMATS = [("hermes", hermes), ("llama3_json", llama3), ("mistral", mistral_v3),
           ("mistral", mistral_v11)]


def assert_calls(parsed, calls):
    assert [c.name for c in parsed.calls] == [n for n, _ in calls]
    assert [json.loads(c.arguments) for c in parsed.calls] == [a for _, a in calls]
    assert all(c.done for c in parsed.calls)


def streamed(parser, text, rng):
    """(content, [(name, arguments, id)]) from the deltas of text fed in random pieces;
    checks each call's id and name come first, once."""
    streamer, content, calls = ToolCallStreamer(parser), "", {}
    pos = 0
    pieces = []
    while pos < len(text):
        step = rng.randint(1, 7)
        pieces.append(text[pos:pos + step])
        pos += step
    deltas = [streamer.feed(p) for p in pieces] + [streamer.finish()]
    for delta in deltas:
        content += delta.content
        for f in delta.calls:
            if f.index not in calls:
                assert f.id and f.id.startswith("call_") and f.name and f.arguments == ""
                assert f.index == len(calls)
                calls[f.index] = [f.name, "", f.id]
            else:
                assert f.id is None and f.name is None
                calls[f.index][1] += f.arguments
    return content, [tuple(v) for v in calls.values()], streamer.final


@pytest.mark.parametrize("name,write", FORMATS)
@pytest.mark.parametrize("calls", [CALLS[:1], CALLS], ids=["single", "parallel"])
def test_round_trip_and_streaming_agree(name, write, calls):
    parser, rng = get_tool_parser(name), random.Random(0)
    for before in ("", "Let me look that up.\n"):
        if name == "llama3_json" and before:
            text = llama3(calls, before)             # text before needs <|python_tag|>
        else:
            text = write(calls, before)
        parsed = parser.parse(text)
        assert_calls(parsed, calls)
        assert parsed.content == before
        for _ in range(3):
            content, stream_calls, final = streamed(parser, text, rng)
            assert content == before
            assert [(n, a) for n, a, _ in stream_calls] == \
                [(c.name, c.arguments) for c in parsed.calls]
            assert len({i for _, _, i in stream_calls}) == len(calls)


def test_llama3_without_python_tag():
    parser = get_tool_parser("llama3_json")
    assert_calls(parser.parse(llama3(CALLS, tag=False)), CALLS)
    typed = json.dumps({"type": "function", "name": "search", "parameters": SEARCH[1]})
    assert_calls(parser.parse("  " + typed), [SEARCH])


MALFORMED = {
    "hermes": ['<tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
               '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
               '<tool_call>\n{"arguments": {}}\n</tool_call>',
               '<tool_call>\n{"name": "f", "arguments": {"a": 1}}} trailing'],
    "llama3_json": ['{"name": "f", "parameters": {"a": }}', '{"city": "Paris"}',
                    '{"name": "f", "parameters": {}} and then some prose'],
    "mistral": ['[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}]',
                '[TOOL_CALLS]f[ARGS]{"a": 1', '[TOOL_CALLS][]', '[TOOL_CALLS]f[ARGS]not json'],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_calls_are_plain_content(name):
    parser = get_tool_parser(name)
    for text in MALFORMED[name] + ["Just an answer, no call.", ""]:
        parsed = parser.parse(text)
        assert parsed.calls == [] and parsed.content == text, text
        content, calls, final = streamed(parser, text, random.Random(1))
        assert final.calls == [] and final.content == text
        if not calls:                      # nothing went out as a call: all of it as content
            assert content == text, text


def test_content_is_held_back_while_a_marker_may_start():
    streamer = ToolCallStreamer(get_tool_parser("hermes"))
    assert streamer.feed("Sure. <tool").content == "Sure. "
    assert streamer.feed("box>").content == "<toolbox>"     # not a marker after all
    assert streamer.finish().content == ""


def test_required_array_and_named_shapes():
    array = json.dumps([{"name": n, "parameters": a} for n, a in CALLS], indent=1)
    assert_calls(JsonArrayParser().parse(array), CALLS)
    content, calls, _ = streamed(JsonArrayParser(), array, random.Random(2))
    assert [(n, json.loads(a)) for n, a, _ in calls] == CALLS
    named = NamedFunctionParser("search")
    assert_calls(named.parse(" " + json.dumps(SEARCH[1])), [SEARCH])
    assert named.parse('{"query": "x"} extra').calls == []
    assert JsonArrayParser().parse("[]").calls == []


def test_detected_from_the_template():
    assert detect_tool_parser("{{ '<tool_call>' }}").name == "hermes"
    assert detect_tool_parser("{{ '<|python_tag|>' }}{{ '<|eom_id|>' }}").name == "llama3_json"
    assert detect_tool_parser({"default": "x", "tool_use": "[TOOL_CALLS]"}).name == "mistral"
    assert detect_tool_parser("{{ messages }}").name == "hermes"
    with pytest.raises(ValueError, match="tool_call_parser"):
        get_tool_parser("nope")


def test_raw_control_characters_in_strings_come_out_escaped():
    """Grammar-constrained output can hold raw control characters inside strings, which
    strict JSON readers refuse: the arguments escape them, streamed fragments too."""
    raw = '<tool_call>\n{"name": "f", "arguments": {"a": "x\x0fy\x01", "b": ["\x1f"]}}\n</tool_call>'
    parsed = get_tool_parser("hermes").parse(raw)
    assert [json.loads(c.arguments) for c in parsed.calls] == [{"a": "x\x0fy\x01", "b": ["\x1f"]}]
    _, calls, _ = streamed(get_tool_parser("hermes"), raw, random.Random(3))
    assert [a for _, a, _ in calls] == [parsed.calls[0].arguments]
    named = NamedFunctionParser("f").parse('{"a": "\x02"}')
    assert json.loads(named.calls[0].arguments) == {"a": "\x02"}
