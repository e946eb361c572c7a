"""Pure ASGI middleware, outermost first: access log, body size limit, API key.

They answer with OpenAI error bodies themselves (they sit outside FastAPI's exception
handlers). Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through
untouched and the access log line is written when the last body byte is sent.
"""
from __future__ import annotations

import hmac
import logging
import time

from fastapi import HTTPException

from fastllm.serve.errors import error_response

access_logger = logging.getLogger("fastllm.serve.access")


class AccessLog:
    """One line per request: id, method and path, status, tokens, TTFT, total time."""

    def __init__(self, app, metrics=None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = [499]           # stays "client closed request" if no response went out
        logged = [False]

        def log():
            if logged[0]:
                return
            logged[0] = True
            record = scope.get("state", {}).get("record")
            if self.metrics is not None:
                self.metrics.http_requests.labels(str(status[0])).inc()
            ms = lambda x: "-" if x is None else f"{x * 1e3:.1f}ms"   # noqa: E731
            access_logger.info(
                '%s "%s %s" %d prompt_tokens=%s generated_tokens=%s ttft=%s total=%s',
                record.request_id if record else "-", scope["method"], scope["path"], status[0],
                record.prompt_tokens if record else "-",
                record.completion_tokens if record else "-",
                ms(record.ttft) if record else "-", ms(time.monotonic() - start))

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log()
        try:
            await self.app(scope, receive, send_logged)
        finally:
            log()


class _BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing passes it on as a 413."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes")


class BodyLimit:
    """413 for a body over max_bytes, by Content-Length or as it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = [0]
        started = [False]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)
        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started[0]:
                await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        response = error_response(f"the request body is over the limit of {self.max_bytes} bytes",
                                  413, code="request_too_large")
        await response(scope, receive, send)


class APIKeyAuth:
    """`Authorization: Bearer <key>` on every route but /health."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            response = error_response("missing or wrong API key (Authorization: Bearer ...)",
                                      401, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)
