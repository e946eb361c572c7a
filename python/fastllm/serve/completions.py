"""POST /v1/completions: prompts (text, token ids, or lists of either) -> choices."""
from __future__ import annotations

from typing import Optional

from fastapi import Request

from fastllm.serve.errors import APIError
from fastllm.serve.generation import (Choice, add_requests, admit, check_model,
                                      completion_logprobs, merge_streams, new_deltas,
                                      new_request_id, observed, sampling_params,
                                      until_disconnected, usage)
from fastllm.serve.metrics import RequestRecord
from fastllm.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from fastllm.serve.sse import SSEResponse, sse_done, sse_error, sse_event


def _prompts(req: CompletionRequest, tokenizer) -> list[tuple[Optional[str], list[int]]]:
    """(text or None, token ids) per prompt; the prompt's four OpenAI forms."""
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise APIError("prompt must not be empty", param="prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    out = []
    for item in items:
        ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError("prompt must not be empty", param="prompt")
        out.append((item if isinstance(item, str) else None, ids))
    return out


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError("best_of other than n is not supported", param="best_of")
    if req.echo and req.logprobs is not None:
        raise APIError("echo with logprobs is not supported (prompt logprobs are not "
                       "computed)", param="echo")


async def create_completion(state, req: CompletionRequest, request: Request):
    check_model(state, req.model)
    _check_supported(req)
    tokenizer = state.llm.tokenizer
    prompts = _prompts(req, tokenizer)
    params = sampling_params(req, state, req.max_tokens, req.logprobs)
    admit(state, len(prompts))
    rid = new_request_id("cmpl")
    record = request.state.record = RequestRecord(rid, sum(len(ids) for _, ids in prompts))
    streams = await add_requests(state, rid, prompts, params, "prompt", req)
    n = params.n
    echoes = [(text if text is not None else tokenizer.decode(ids)) if req.echo else ""
              for text, ids in prompts]
    choices = {i: Choice(i) for i in range(len(prompts) * n)}
    model = req.model or state.config.served_model_names[0]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(state, streams, choices, echoes, n, rid, model, record, include_usage,
                         req.logprobs is not None)
        return SSEResponse(events)
    return await until_disconnected(request, _collect(state, streams, choices, echoes, n, rid,
                                                      model, record, req.logprobs is not None))


def _piece(state, choice, sample, with_logprobs):
    if not with_logprobs:
        return None
    return completion_logprobs(choice, sample.token_ids, sample.logprobs or [], state.token_text)


async def _collect(state, streams, choices, echoes, n, rid, model, record, with_logprobs):
    with observed(state, record):
        async for prompt_index, out in merge_streams(streams):
            for _, sample, _ in new_deltas(out, prompt_index * n, choices):
                record.on_tokens(len(sample.token_ids))
        record.finish(choices[0].finish_reason)
    out_choices = []
    for c in choices.values():
        logprobs = None
        if with_logprobs:
            logprobs = completion_logprobs(Choice(c.index), c.token_ids, c.logprobs,
                                           state.token_text)
        out_choices.append(CompletionChoice(
            index=c.index, text=echoes[c.index // n] + c.text, logprobs=logprobs,
            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    return CompletionResponse(id=rid, model=model, choices=out_choices, usage=usage(record))


async def _stream(state, streams, choices, echoes, n, rid, model, record, include_usage,
                  with_logprobs):
    def chunk(index, text, logprobs=None, finish_reason=None, stop_reason=None):
        c = CompletionChoice(index=index, text=text, logprobs=logprobs,
                             finish_reason=finish_reason, stop_reason=stop_reason)
        return sse_event(CompletionResponse(id=rid, model=model, choices=[c]))
    try:
        with observed(state, record):
            for i in choices:
                if echoes[i // n]:
                    yield chunk(i, echoes[i // n])
            async for prompt_index, out in merge_streams(streams):
                for choice, sample, finished in new_deltas(out, prompt_index * n, choices):
                    record.on_tokens(len(sample.token_ids))
                    yield chunk(choice.index, sample.text,
                                _piece(state, choice, sample, with_logprobs),
                                choice.finish_reason if finished else None,
                                choice.stop_reason if finished else None)
            record.finish(choices[0].finish_reason)
        if include_usage:
            yield sse_event(CompletionResponse(id=rid, model=model, choices=[], usage=usage(record)))
    except Exception as e:               # a failed step or shutdown: tell the client, end cleanly
        yield sse_error(e)
    yield sse_done()
