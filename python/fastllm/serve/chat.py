"""POST /v1/chat/completions: messages through the model's chat template -> choices.

Streaming sends, per choice, the role first, then content deltas, then an empty delta
with finish_reason; then usage when stream_options.include_usage asks.
"""
from __future__ import annotations

import jinja2
from fastapi import Request

from fastllm.serve.errors import APIError
from fastllm.serve.generation import (Choice, add_requests, admit, chat_logprobs,
                                      check_model, merge_streams, new_deltas, new_request_id,
                                      observed, sampling_params, until_disconnected, usage)
from fastllm.serve.metrics import RequestRecord
from fastllm.serve.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatLogprobs, ChatMessageOut,
                                    ChatStreamChoice, DeltaMessage)
from fastllm.serve.sse import SSEResponse, sse_done, sse_error, sse_event


def message_dicts(messages) -> list[dict]:
    """Messages as the chat template takes them; content parts joined (text only)."""
    if not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(f"content part type {part.type!r} is not supported (text only)",
                                   param=f"messages.{i}.content")
                texts.append(part.text)
            content = "".join(texts)
        item = {"role": m.role, "content": content or ""}
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def render_prompt(tokenizer, messages, add_generation_prompt: bool, template_kwargs) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(message_dicts(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            tokenize=True, **(template_kwargs or {}))
    except APIError:
        raise
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as e:
        raise APIError(f"messages could not be rendered with the chat template: {e}",
                       param="messages") from None
    if not ids:
        raise APIError("the rendered chat prompt is empty", param="messages")
    return ids


async def create_chat_completion(state, req: ChatCompletionRequest, request: Request):
    check_model(state, req.model)
    ids = render_prompt(state.llm.tokenizer, req.messages, req.add_generation_prompt is not False,
                        req.chat_template_kwargs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
    num_top = req.top_logprobs or 0
    params = sampling_params(req, state, max_tokens, num_top if req.logprobs else None)
    admit(state, 1)
    rid = new_request_id("chatcmpl")
    record = request.state.record = RequestRecord(rid, len(ids))
    streams = await add_requests(state, rid, [(None, ids)], params, "messages", req)
    choices = {i: Choice(i) for i in range(params.n)}
    model = req.model or state.config.served_model_names[0]
    logprobs = num_top if req.logprobs else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return SSEResponse(_stream(state, streams, choices, rid, model, record, include_usage,
                                   logprobs))
    return await until_disconnected(request, _collect(state, streams, choices, rid, model,
                                                      record, logprobs))


def _logprobs(state, token_ids, logprobs, num_top):
    if num_top is None:
        return None
    return ChatLogprobs(content=chat_logprobs(token_ids, logprobs or [], num_top, state.token_text))


async def _collect(state, streams, choices, rid, model, record, num_top):
    with observed(state, record):
        async for _, out in merge_streams(streams):
            for _, sample, _ in new_deltas(out, 0, choices):
                record.on_tokens(len(sample.token_ids))
        record.finish(choices[0].finish_reason)
    out = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text),
                      logprobs=_logprobs(state, c.token_ids, c.logprobs, num_top),
                      finish_reason=c.finish_reason, stop_reason=c.stop_reason)
           for c in choices.values()]
    return ChatCompletionResponse(id=rid, model=model, choices=out, usage=usage(record))


async def _stream(state, streams, choices, rid, model, record, include_usage, num_top):
    def chunk(index, delta, logprobs=None, finish_reason=None):
        c = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs,
                             finish_reason=finish_reason)
        return sse_event(ChatCompletionChunk(id=rid, model=model, choices=[c]))
    try:
        with observed(state, record):
            for i in choices:
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for _, out in merge_streams(streams):
                for choice, sample, finished in new_deltas(out, 0, choices):
                    record.on_tokens(len(sample.token_ids))
                    if sample.text or sample.token_ids:
                        yield chunk(choice.index, DeltaMessage(content=sample.text),
                                    _logprobs(state, sample.token_ids, sample.logprobs, num_top))
                    if finished:
                        yield chunk(choice.index, DeltaMessage(), finish_reason=choice.finish_reason)
            record.finish(choices[0].finish_reason)
        if include_usage:
            yield sse_event(ChatCompletionChunk(id=rid, model=model, choices=[],
                                                usage=usage(record)))
    except Exception as e:               # a failed step or shutdown: tell the client, end cleanly
        yield sse_error(e)
    yield sse_done()
