"""Server-sent events: `data: {json}\\n\\n` per chunk, `data: [DONE]\\n\\n` last.

SSEResponse closes its event generator however the response ends (finished, client
gone, server cancelling), so the generator's cleanup (aborting its engine requests)
runs at once rather than at garbage collection.
"""
from __future__ import annotations

import json

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from fastllm.engine.async_llm import EngineStepError, RequestAbortedError
from fastllm.serve.errors import error_body


def sse_event(payload) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


def sse_error(e: BaseException) -> str:
    """The error event a stream ends with (OpenAI clients raise it as an APIError)."""
    if isinstance(e, RequestAbortedError):
        body = error_body(str(e), 503, code="aborted")
    elif isinstance(e, EngineStepError):
        body = error_body(str(e), 500, code="engine_step_failed")
    else:
        body = error_body(f"{type(e).__name__}: {e}", 500)
    return sse_event(body)


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events):
        super().__init__(events, headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()
