"""Rendering a model's chat template (Jinja2) the way transformers does.

Same environment as HF's `apply_chat_template`: sandboxed, trim_blocks + lstrip_blocks,
loop controls, a `tojson` that keeps non-ASCII text, `raise_exception(msg)` and
`strftime_now(fmt)` globals, and `{% generation %}` blocks accepted (rendered as is),
so templates written for transformers render byte for byte the same here.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Optional, Union

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fastllm.tokenizer.tool_prompt import with_tool_prompt


class _GenerationBlock(Extension):
    # HF marks assistant text with {% generation %}...{% endgeneration %} to build
    # masks for training; for inference the block just renders its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not valid Jinja2: {e}") from e


@lru_cache(maxsize=16)
def template_takes_tools(source: str) -> bool:
    """Whether the template reads the `tools` variable at all."""
    try:
        ast = _environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not valid Jinja2: {e}") from e
    return "tools" in meta.find_undeclared_variables(ast)


def select_template(chat_template: Union[str, dict, None], tools=None) -> str:
    """A tokenizer may carry several named templates ({"default": ..., "tool_use": ...})."""
    if chat_template is None:
        raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / GGUF "
                         "tokenizer.chat_template); pass a plain prompt instead")
    if isinstance(chat_template, dict):
        if tools and "tool_use" in chat_template:
            return chat_template["tool_use"]
        if "default" not in chat_template:
            raise ValueError(f"chat_template has no 'default' entry (names: {sorted(chat_template)})")
        return chat_template["default"]
    return chat_template


def render_chat_template(chat_template: Union[str, dict, None], messages: list,
                         add_generation_prompt: bool = True, tools: Optional[list] = None,
                         documents: Optional[list] = None, **context) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]). `tools`
    (OpenAI function specs) go to the template's `tools` variable as in transformers;
    a template that does not read it gets them as a system prompt (tool_prompt.py).

    `context` carries the special token strings (bos_token, eos_token, ...) and any
    extra template variables (e.g. enable_thinking)."""
    messages = normalize_messages(messages)
    source = select_template(chat_template, tools)
    if tools and not template_takes_tools(source):
        messages = with_tool_prompt(messages, tools)
    template = compile_template(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=tools, documents=documents, **context)
    except (jinja2.TemplateError, TypeError) as e:
        # TypeError: the template did arithmetic on a value of the wrong type (user data).
        raise ValueError(f"chat_template rejected the messages: {e}") from e


def normalize_messages(messages) -> list:
    """Messages as every template expects them: a str role and a str content. As vLLM
    does, content None renders as '' and OpenAI-style content parts
    ([{"type": "text", "text": ...}, ...]) are joined with newlines; anything else is a
    ValueError naming the message index and field. Other keys (name, tool_calls, ...)
    pass through; a message without content keeps none."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string, got {role!r}")
        message = dict(message)
        if "content" in message:
            message["content"] = _content_text(message["content"], i)
        out.append(message)
    return out


def _content_text(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"messages[{index}].content must be a string, a list of text parts or "
                         f"null, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        if not isinstance(part, dict):
            raise ValueError(f"{where} must be a dict like {{'type': 'text', 'text': ...}}, "
                             f"got {type(part).__name__}")
        if part.get("type", "text") != "text":
            raise ValueError(f"{where}.type {part.get('type')!r} is not supported (text parts only)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text must be a string, got {part.get('text')!r}")
        texts.append(part["text"])
    return "\n".join(texts)
