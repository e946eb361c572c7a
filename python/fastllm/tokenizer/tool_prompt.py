"""Tools for a chat template that does not take them: the tool schemas as a system
prompt, earlier calls and their results as plain text, in the Hermes format (the one
fastllm's default tool parser reads back).

Used when a template does not read the `tools` variable: HF's apply_chat_template
would silently drop them, and the model would never hear of its tools.
"""
from __future__ import annotations

import json

_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. The functions, as "
    "JSON schemas, are:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments JSON object>}}\n</tool_call>')


def tools_system_prompt(tools: list) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return _INSTRUCTIONS.format(tools=lines)


def _call_text(call: dict) -> str:
    function = call.get("function", call) if isinstance(call, dict) else {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def with_tool_prompt(messages: list, tools: list) -> list:
    """messages (normalized) rewritten for a template without tools: the tool prompt in
    the system message, assistant calls as <tool_call> text, tool results as user turns
    in <tool_response> tags."""
    prompt = tools_system_prompt(tools)
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = "\n".join(_call_text(c) for c in message.pop("tool_calls"))
            message["content"] = "\n".join(t for t in (message.get("content"), calls) if t)
        if message["role"] == "tool":
            message = {"role": "user",
                       "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
        out.append(message)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{prompt}".lstrip()}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
