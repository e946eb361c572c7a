"""Errors as OpenAI writes them: {"error": {"message", "type", "param", "code"}}.

Every failure the server answers goes through here: a request it refuses (APIError and
its ValueError from SamplingParams or the engine), FastAPI's 422 validation error and
malformed JSON (both 400, naming the field), Starlette's HTTP errors (404, 405) and
anything unexpected (500, logged). The server keeps serving after all of them.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastllm.serve.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("fastllm.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.headers = headers


def error_body(message: str, status: int, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"),
                     param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(message: str, status: int, param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status,
                        headers=headers)


def from_value_error(e: ValueError, param: Optional[str] = None) -> APIError:
    """A ValueError from SamplingParams ("SamplingParams.top_p must ...") names its field."""
    message = str(e)
    match = re.match(r"SamplingParams\.(\w+)", message)
    if match:
        param = match.group(1)
    code = "context_length_exceeded" if "max_model_len" in message else None
    return APIError(message, 400, param=param, code=code)


def _validation_message(err: dict) -> tuple[str, Optional[str]]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}", None
    # Union members show up as loc parts ("prompt.str"); the field is what the user wrote.
    field_path = []
    for part in loc:
        if part in ("str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]",
                    "function-after", "list[ContentPart]", "NamedToolChoice") \
                or part.startswith(("list[", "dict[", "literal[")):
            continue
        field_path.append(part)
    param = ".".join(field_path) or None
    if param is None and err.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    return (f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.message, e.status, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error(s))"
        return error_response(message, 400, param)

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, e: json.JSONDecodeError):
        return error_response(f"the request body is not valid JSON: {e}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        status = e.status_code
        code = "request_too_large" if status == 413 else None
        return error_response(str(e.detail), status, code=code,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return error_response(f"internal error: {type(e).__name__}: {e}", 500)
