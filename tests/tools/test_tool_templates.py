"""Tools through chat templates: fastllm's rendering against transformers'
apply_chat_template(tools=...) on the same template strings, and the system-prompt
fallback for a template that takes no tools."""
from __future__ import annotations

import json
import os

import pytest

from checkpoints import CHAT_TEMPLATE, cached_checkpoint
from templates import CONVERSATION, HERMES_TOOLS, LLAMA3_TOOLS, SEARCH_TOOL, WEATHER_TOOL
from fastllm.tokenizer.chat_template import template_takes_tools
from fastllm.tokenizer.tokenizer import Tokenizer

TOOLS = [WEATHER_TOOL, SEARCH_TOOL]


@pytest.fixture(scope="module")
def tokenizers():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = cached_checkpoint("llama")
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(str(path))


def hf_text(hf, messages, template, tools):
    return hf.apply_chat_template(messages, tools=tools, chat_template=template,
                                  add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("template", [HERMES_TOOLS, LLAMA3_TOOLS], ids=["hermes", "llama3"])
def test_tools_render_as_transformers_does(tokenizers, template):
    ours, hf = tokenizers
    for messages, tools in ((CONVERSATION, TOOLS), (CONVERSATION[:2], TOOLS[:1]),
                            (CONVERSATION[:2], None)):
        text = ours.apply_chat_template(messages, tools=tools, chat_template=template,
                                        tokenize=False)
        assert text == hf_text(hf, messages, template, tools)
        assert ("get_weather" in text) == bool(tools)
    ids = ours.apply_chat_template(CONVERSATION, tools=TOOLS, chat_template=template)
    assert ids == hf.encode(hf_text(hf, CONVERSATION, template, TOOLS), add_special_tokens=False)


def test_template_without_tools_gets_them_as_a_system_prompt(tokenizers):
    ours, hf = tokenizers
    assert not template_takes_tools(CHAT_TEMPLATE) and template_takes_tools(HERMES_TOOLS)
    text = ours.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False)
    plain = hf_text(hf, CONVERSATION, CHAT_TEMPLATE, TOOLS)      # transformers drops the tools
    assert "get_weather" not in plain.split("<|im_start|>user")[0]
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.")
    for tool in TOOLS:
        assert json.dumps(tool, ensure_ascii=False) in system
    # The earlier call and its result, as the hermes parser would read them back.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, ' \
           '"unit": "c"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>" in text
    # Without tools nothing changes: the same text as transformers'.
    assert ours.apply_chat_template(CONVERSATION, tokenize=False) == \
        hf_text(hf, CONVERSATION, CHAT_TEMPLATE, None)
