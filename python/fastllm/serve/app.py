"""The FastAPI app: OpenAI routes, tokenizer routes, /generate, /health, /metrics, and the
chat page at /.

    app = create_app(AsyncLLM.from_pretrained(path), ServerConfig(["my-model"]))
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from fastllm.engine.async_llm import AsyncLLM, RequestAbortedError
from fastllm.serve.chat import create_chat_completion, render_prompt
from fastllm.serve.completions import create_completion
from fastllm.serve.errors import APIError, install_error_handlers
from fastllm.serve.generation import (ClientDisconnected, Choice, add_requests, admit,
                                      check_model, merge_streams, new_deltas, new_request_id, observed,
                                      sampling_params, token_text_fn, until_disconnected)
from fastllm.serve.metrics import RequestRecord, ServerMetrics
from fastllm.serve.middleware import AccessLog, APIKeyAuth, BodyLimit
from fastllm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    DetokenizeResponse, GenerateRequest, GenerateResponse,
                                    ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                    UsageInfo)

CHAT_PAGE = "index.html"


@dataclass
class ServerConfig:
    served_model_names: list
    api_key: Optional[str] = None
    max_queue_len: Optional[int] = None     # None: no limit
    max_body_bytes: int = 8 << 20
    shutdown_grace_s: float = 30.0
    model_path: Optional[str] = None
    tool_call_parser: Optional[str] = None  # None / "auto": the chat template's format
    disable_any_whitespace: bool = False    # structured JSON outputs: compact (--disable-any-whitespace)


class ServerState:
    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        self.llm, self.config = llm, config
        self.metrics = ServerMetrics(llm)
        self.defaults = llm.llm.generation_defaults()
        self.max_logprobs = llm.engine.config.max_logprobs
        self.token_text = token_text_fn(llm.tokenizer)
        self.draining = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def begin_shutdown(self) -> None:
        """Refuse new requests; abort those still running after the grace period.
        Thread- and signal-safe."""
        if self.loop is None or self.draining:
            return
        self.draining = True
        grace = self.config.shutdown_grace_s

        def abort_rest():
            self.llm.abort_all(RequestAbortedError(
                f"the server is shutting down: request aborted after the {grace:g} s grace period"))
        self.loop.call_soon_threadsafe(self.loop.call_later, grace, abort_rest)


def create_app(llm: AsyncLLM, config: ServerConfig) -> FastAPI:
    state = ServerState(llm, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        llm.start()
        yield
        await llm.shutdown()

    app = FastAPI(title="fastllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.fastllm = state
    install_error_handlers(app)
    _add_openai_routes(app, state)
    _add_other_routes(app, state)
    # add_middleware puts each one outside the previous: the access log is outermost.
    if config.api_key:
        app.add_middleware(APIKeyAuth, api_key=config.api_key)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(AccessLog, metrics=state.metrics)
    return app


async def _guard(request: Request, handler):
    """A request the client abandoned gets 499 (nobody reads it); shutdown aborts 503."""
    try:
        return await handler
    except ClientDisconnected:
        return Response(status_code=499)
    except RequestAbortedError as e:
        raise APIError(str(e), 503, code="aborted") from None


def _add_openai_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _guard(request, create_completion(state, req, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await _guard(request, create_chat_completion(state, req, request))

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=name, root=state.config.model_path,
                                         max_model_len=state.llm.max_model_len)
                               for name in state.config.served_model_names])


def _add_other_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.llm.tokenizer

    @app.get("/health")
    async def health():
        if not state.llm.is_running:
            raise APIError("the engine is not running", 503)
        return JSONResponse({})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = render_prompt(tokenizer, req.messages, req.add_generation_prompt, None)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.llm.max_model_len)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(state, req.model)
        # Tokenizer.decode reads ids past the vocabulary as '' (a padded embedding's
        # samples); a client asking for them gets told instead.
        outside = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if outside:
            raise APIError(f"tokens holds ids outside the vocabulary [0, {tokenizer.vocab_size}): "
                           f"{outside[:5]}", param="tokens")
        try:
            return DetokenizeResponse(prompt=tokenizer.decode(req.tokens))
        except ValueError as e:
            raise APIError(str(e), param="tokens") from None

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        return await _guard(request, _generate(state, req, request))

    @app.get("/", include_in_schema=False)
    async def chat_page():
        page = importlib.resources.files("fastllm.serve") / "static" / CHAT_PAGE
        with importlib.resources.as_file(page) as path:
            return FileResponse(path, media_type="text/html")


async def _generate(state: ServerState, req: GenerateRequest, request: Request):
    """seeds/004's endpoint: one prompt, the whole completion at once."""
    check_model(state, req.model)
    if req.stream:
        raise APIError("/generate does not stream; use /v1/completions", param="stream")
    ids = state.llm.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not ids:
        raise APIError("prompt must not be empty", param="prompt")
    params = sampling_params(req, state, req.max_tokens, None)
    if params.n != 1:
        raise APIError("/generate returns one completion; n must be 1", param="n")
    admit(state, 1)
    rid = new_request_id("gen")
    record = request.state.record = RequestRecord(rid, len(ids))
    text = req.prompt if isinstance(req.prompt, str) else None
    streams = await add_requests(state, rid, [(text, ids)], params, "prompt")
    choices = {0: Choice(0)}

    async def collect():
        with observed(state, record):
            async for _, out in merge_streams(streams):
                for _, sample, _ in new_deltas(out, 0, choices):
                    record.on_tokens(len(sample.token_ids))
            record.finish(choices[0].finish_reason)
    await until_disconnected(request, collect())
    c = choices[0]
    return GenerateResponse(text=c.text, tokens=c.token_ids, finish_reason=c.finish_reason,
                            usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=len(c.token_ids),
                                            total_tokens=len(ids) + len(c.token_ids)))
