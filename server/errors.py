"""The one error path: every failure leaves as {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.types import EngineError
from server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("janus.errors")

ERROR_TYPES = {
    401: "authentication_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
STATUS_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}
# pydantic names union branches in error locations ("str", "list[ContentPart]", "ImageURL"); field names are snake_case
FIELD_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
TYPE_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}
CLIENT_CLOSED_REQUEST = 499


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


class APIError(Exception):
    """A request the server refuses, with the status and error body to answer it with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    detail = ErrorDetail(message=message, type=error_type(status), param=param, code=code)
    return ErrorResponse(error=detail).model_dump()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code, param=param), status_code=status, headers=headers)


def retry_after_headers(seconds: float | None) -> dict[str, str]:
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def engine_error_parts(exc: EngineError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, error body and headers of an engine failure (also used for errors inside streams)."""
    body = error_body(exc.status, exc.message, code=exc.code, param=exc.param)
    return exc.status, body, retry_after_headers(getattr(exc, "retry_after", None))


def field_path(loc: Sequence[str | int]) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; union branch labels are left out."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif FIELD_NAME.match(part) and part not in TYPE_LABELS:
            path += f".{part}" if path else part
    return path or None


def validation_error(errors: Sequence[Mapping[str, Any]], *, in_body: bool) -> APIError:
    """400 naming the most specific failing field; `in_body`: FastAPI locations start with "body"."""
    located = [(tuple(e.get("loc", ()))[1:] if in_body else tuple(e.get("loc", ())), e) for e in errors]
    loc, error = max(located, key=lambda item: len(item[0]), default=((), {"msg": "invalid request", "type": ""}))
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        position = f" at position {loc[0]}" if loc and isinstance(loc[0], int) else ""
        return APIError(400, f"The body is not valid JSON: {reason}{position}.", code="invalid_json")
    param = field_path(loc)
    if param is None:
        message = "The body is required: a JSON object." if kind == "missing" else "The body must be a JSON object."
        return APIError(400, message, code="invalid_body")
    code = "missing_field" if kind == "missing" else "unknown_field" if kind == "extra_forbidden" else "invalid_value"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}", code=code, param=param)


async def handle_api_error(request: Request, exc: APIError) -> Response:
    return error_response(exc.status, exc.message, code=exc.code, param=exc.param, headers=exc.headers)


async def handle_engine_error(request: Request, exc: EngineError) -> Response:
    status, body, headers = engine_error_parts(exc)
    if status >= 500:
        log.log(logging.ERROR if status == 500 else logging.WARNING, "engine: %s: %s", exc.code, exc.message)
    return JSONResponse(body, status_code=status, headers=headers)


async def handle_request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return await handle_api_error(request, validation_error(exc.errors(), in_body=True))


async def handle_http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        message = f"No route {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, code=STATUS_CODES.get(exc.status_code), headers=exc.headers)


async def handle_client_disconnected(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def internal_error_body(request_id: str) -> dict[str, Any]:
    message = f"Internal server error (request {request_id}); the server log has the details."
    return error_body(500, message, code="internal_error")


def internal_error_response(request_id: str) -> JSONResponse:
    return JSONResponse(internal_error_body(request_id), status_code=500)


def install_error_handlers(app: FastAPI, validation_handler=handle_request_validation_error) -> None:
    """`validation_handler`: for RequestValidationError (the app's checks the API key first)."""
    app.add_exception_handler(APIError, handle_api_error)
    app.add_exception_handler(EngineError, handle_engine_error)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(ClientDisconnected, handle_client_disconnected)
