"""POST /v1/chat/completions: messages through the model's chat template -> choices.

Streaming sends, per choice, the role first, then content deltas, then an empty delta
with finish_reason; then usage when stream_options.include_usage asks. With tools
(tools.py), a choice whose output holds calls answers `tool_calls` (streamed as OpenAI
does: id and name first, then argument fragments) and finish_reason "tool_calls".
"""
from __future__ import annotations

import dataclasses
import json

import jinja2
from fastapi import Request

from fastllm.serve.errors import APIError
from fastllm.serve.generation import (Choice, add_requests, admit, chat_logprobs,
                                      check_model, merge_streams, new_deltas, new_request_id,
                                      observed, sampling_params, until_disconnected, usage)
from fastllm.serve.metrics import RequestRecord
from fastllm.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatLogprobs, ChatMessageOut,
                                    ChatStreamChoice, DeltaFunctionCall, DeltaMessage,
                                    DeltaToolCall)
from fastllm.serve.sse import SSEResponse, sse_done, sse_error, sse_event
from fastllm.serve.tool_parsers import ToolCallStreamer
from fastllm.serve.tools import ToolPlan, plan_tools, tool_calls_out, tool_constraint


def message_dicts(messages) -> list[dict]:
    """Messages as the chat template takes them; content parts joined (text only);
    earlier tool calls with their arguments as objects (HF templates' convention)."""
    if not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        item = {"role": m.role, "content": _content_text(m.content, i)}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_calls:
            item["tool_calls"] = [_call_dict(c) for c in m.tool_calls]
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError("a message of role 'tool' needs tool_call_id (the call it "
                               "answers)", param=f"messages.{i}.tool_call_id")
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def _content_text(content, index: int) -> str:
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(f"content part type {part.type!r} is not supported (text only)",
                           param=f"messages.{index}.content")
        texts.append(part.text)
    return "".join(texts)


def _call_dict(call) -> dict:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass                        # the template shows it as the string it is
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


def render_prompt(tokenizer, messages, add_generation_prompt: bool, template_kwargs,
                  tools=None) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(message_dicts(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            tokenize=True, tools=tools, **(template_kwargs or {}))
    except APIError:
        raise
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
        raise APIError(f"messages could not be rendered with the chat template: {e}",
                       param="messages") from None
    if not ids:
        raise APIError("the rendered chat prompt is empty", param="messages")
    return ids


def _tool_params(params, plan: ToolPlan, req):
    """The request's SamplingParams under its ToolPlan: the grammar for required/named,
    special tokens kept where the parser reads them."""
    if plan.schema is not None:
        params = tool_constraint(params, plan.schema)
    if plan.parser is not None and plan.parser.needs_special_tokens \
            and req.skip_special_tokens is None:
        params = dataclasses.replace(params, skip_special_tokens=False)
    return params


async def create_chat_completion(state, req: ChatCompletionRequest, request: Request):
    check_model(state, req.model)
    tokenizer = state.llm.tokenizer
    plan = plan_tools(req, state.config.tool_call_parser, tokenizer.chat_template)
    ids = render_prompt(tokenizer, req.messages, req.add_generation_prompt is not False,
                        req.chat_template_kwargs, plan.tools if plan else None)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    num_top = req.top_logprobs or 0
    params = sampling_params(req, state, max_tokens, num_top if req.logprobs else None)
    parser = None
    if plan is not None:
        params, parser = _tool_params(params, plan, req), plan.parser
    admit(state, 1)
    rid = new_request_id("chatcmpl")
    record = request.state.record = RequestRecord(rid, len(ids))
    try:
        streams = await add_requests(state, rid, [(None, ids)], params, "messages", req)
    except APIError as e:
        if plan is not None and plan.schema is not None and e.param is None:
            e.param = "tools"              # the grammar built from the tools' parameters
        raise
    choices = {i: Choice(i) for i in range(params.n)}
    model = req.model or state.config.served_model_names[0]
    logprobs = num_top if req.logprobs else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(_stream(state, streams, choices, rid, model, record, include_usage,
                                   logprobs, parser))
    return await until_disconnected(request, _collect(state, streams, choices, rid, model,
                                                      record, logprobs, parser))


def _logprobs(state, token_ids, logprobs, num_top):
    if num_top is None:
        return None
    return ChatLogprobs(content=chat_logprobs(token_ids, logprobs or [], num_top, state.token_text))


def _answer(choice: Choice, parser) -> tuple[ChatMessageOut, str]:
    """The message and finish_reason of a finished choice: its calls when the parser
    finds any, else its text as content."""
    if parser is None:
        return ChatMessageOut(content=choice.text), choice.finish_reason
    parsed = parser.parse(choice.text, final=True)
    if not parsed.calls:
        return ChatMessageOut(content=choice.text), choice.finish_reason
    return (ChatMessageOut(content=parsed.content.strip() or None,
                           tool_calls=tool_calls_out(parsed)), "tool_calls")


async def _collect(state, streams, choices, rid, model, record, num_top, parser):
    with observed(state, record):
        async for _, out in merge_streams(streams):
            for _, sample, _ in new_deltas(out, 0, choices):
                record.on_tokens(len(sample.token_ids))
        record.finish(choices[0].finish_reason)
    out = []
    for c in choices.values():
        message, finish_reason = _answer(c, parser)
        out.append(ChatChoice(index=c.index, message=message,
                              logprobs=_logprobs(state, c.token_ids, c.logprobs, num_top),
                              finish_reason=finish_reason, stop_reason=c.stop_reason))
    return ChatCompletionResponse(id=rid, model=model, choices=out, usage=usage(record))


def _tool_delta(piece) -> DeltaMessage:
    """A ToolCallStreamer delta in OpenAI's shape."""
    calls = [DeltaToolCall(index=f.index, id=f.id, type="function" if f.id else None,
                           function=DeltaFunctionCall(name=f.name, arguments=f.arguments))
             for f in piece.calls]
    return DeltaMessage(content=piece.content or None, tool_calls=calls or None)


async def _stream(state, streams, choices, rid, model, record, include_usage, num_top, parser):
    def chunk(index, delta, logprobs=None, finish_reason=None):
        c = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                             finish_reason=finish_reason)
        return sse_event(ChatCompletionChunk(id=rid, model=model, choices=[c]))
    streamers = {i: ToolCallStreamer(parser) for i in choices} if parser else {}
    try:
        with observed(state, record):
            for i in choices:
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for _, out in merge_streams(streams):
                for choice, sample, finished in new_deltas(out, 0, choices):
                    record.on_tokens(len(sample.token_ids))
                    for event in _choice_events(state, chunk, choice, sample, finished,
                                                streamers.get(choice.index), num_top):
                        yield event
            record.finish(choices[0].finish_reason)
        if include_usage:
            yield sse_event(ChatCompletionChunk(id=rid, model=model, choices=[],
                                                usage=usage(record)))
    except Exception as e:               # a failed step or shutdown: tell the client, end cleanly
        yield sse_error(e)
    yield sse_done()


def _choice_events(state, chunk, choice, sample, finished, streamer, num_top):
    """The events of one choice's new output: content or tool-call deltas (through the
    streamer when the request has tools), then its finish."""
    logprobs = _logprobs(state, sample.token_ids, sample.logprobs, num_top)
    if streamer is None:
        if sample.text or sample.token_ids:
            yield chunk(choice.index, DeltaMessage(content=sample.text), logprobs)
        if finished:
            yield chunk(choice.index, DeltaMessage(), finish_reason=choice.finish_reason)
        return
    piece = streamer.feed(sample.text)
    if piece or logprobs is not None:
        yield chunk(choice.index, _tool_delta(piece), logprobs)
    if finished:
        rest = streamer.finish()
        if rest:
            yield chunk(choice.index, _tool_delta(rest))
        reason = "tool_calls" if streamer.final.calls else choice.finish_reason
        yield chunk(choice.index, DeltaMessage(), finish_reason=reason)
