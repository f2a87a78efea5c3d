"""The FastAPI application: routes, error handlers, the API key check and the request middleware."""
from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.responses import Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import routes_native, routes_openai, routes_ops, routes_playground
from server.engine.client import EngineClient
from server.engine.types import new_request_id
from server.errors import (
    CLIENT_CLOSED_REQUEST,
    APIError,
    error_response,
    handle_api_error,
    handle_request_validation_error,
    install_error_handlers,
    internal_error_response,
)
from server.http import drain, drain_bound
from server.metrics import ServerMetrics
from server.protocol import apply_limits
from server.settings import Settings

log = logging.getLogger("janus.server")
access_log = logging.getLogger("janus.access")

# a client's X-Request-Id is echoed only if it is short and plain enough to put in logs
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/=+-]{1,128}$")

bearer_scheme = HTTPBearer(auto_error=False, description="The server's API key (JANUS_API_KEY).")


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    check_api_key(request.app.state.settings, credentials)


def check_api_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    expected = settings.api_key
    if expected is None:
        return
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise APIError(
            401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key", headers=challenge
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode()):
        raise APIError(401, "Invalid API key.", code="invalid_api_key", headers=challenge)


def is_protected(request: Request) -> bool:
    """Whether the matched route sits behind the API key (the native and OpenAI routers)."""
    route = request.scope.get("route")
    return route is not None and any(route is r for r in (*routes_native.router.routes, *routes_openai.router.routes))


async def handle_request_validation_error_after_auth(request: Request, exc: RequestValidationError) -> Response:
    """FastAPI parses and validates the body before it runs the route's dependencies, so a malformed
    body would answer 400 before the API key is looked at: check the key first."""
    if is_protected(request):
        try:
            check_api_key(request.app.state.settings, await bearer_scheme(request))
        except APIError as error:
            return await handle_api_error(request, error)
    return await handle_request_validation_error(request, exc)


class RequestMiddleware:
    """Per request: the X-Request-Id, the body size cap (checked while reading, before the app runs),
    the catch-all 500, request metrics and the access log line."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: ServerMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def read_body(self, headers: Headers, receive: Receive) -> bytes | int:
        """The whole body, or the status to answer instead (413 over the cap, 499 client gone).
        An oversize body is drained first, up to a bound, so that a client still sending reads the 413."""
        limit = self.settings.max_body_bytes
        bound = drain_bound(limit)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= bound:
                await drain(receive, bound)
            return 413
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return CLIENT_CLOSED_REQUEST
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await drain(receive, bound, size)
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        engine_request_id = new_request_id()
        client_id = headers.get("x-request-id", "")
        request_id = client_id if CLIENT_REQUEST_ID.match(client_id) else engine_request_id
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, engine_request_id=engine_request_id)
        status = 0
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.record_request(scope, status, time.perf_counter() - started)

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif not message.get("more_body", False):
                record()  # before the last byte leaves, so a client's next request sees this one counted
            await send(message)

        try:
            body = await self.read_body(headers, receive)
            if body == 413:
                limit = self.settings.max_body_bytes
                response = error_response(
                    413, f"The request body is over {limit} bytes.", code="body_too_large",
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send_with_request_id)
            elif body == CLIENT_CLOSED_REQUEST:
                status = CLIENT_CLOSED_REQUEST
            else:
                await self.app(scope, replay_body(body, receive), send_with_request_id)
        except Exception:
            log.exception("request %s %s %s failed", request_id, scope["method"], scope["path"])
            if status == 0:
                await internal_error_response(request_id)(scope, receive, send_with_request_id)
        finally:
            record()

    def record_request(self, scope: Scope, status: int, duration: float) -> None:
        """The request metrics and the access log line."""
        route_path = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.observe_request(scope["method"], route_path, status, duration)
        state = scope["state"]
        client = scope.get("client")
        access_log.info(
            "%s %s %s", scope["method"], scope["path"], status,
            extra={"fields": {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_s": round(duration, 4),
                "request_id": state["request_id"],
                "client": client[0] if client else None,
                "usage": state.get("usage"),
            }},
        )


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then passes on to the server (for disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return receive_replayed


def document_limits(app: FastAPI, settings: Settings) -> None:
    """/openapi.json states this server's limits, so clients and fuzzers know them."""
    tokens = {"maximum": settings.max_new_tokens_limit}
    limits = {
        "max_new_tokens": tokens,
        "max_tokens": tokens,
        "max_completion_tokens": tokens,
        "question": {"maxLength": settings.max_prompt_chars},
        "prompt": {"maxLength": settings.max_prompt_chars},
        "images": {"maxItems": settings.max_images},
        "image": {"maxItems": settings.max_images},
    }
    build_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            apply_limits(build_openapi(), limits)
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings, engine: EngineClient | None = None) -> FastAPI:
    """The app; it starts and stops the engine itself unless one is passed in."""
    owns_engine = engine is None
    engine = engine if engine is not None else EngineClient(settings.engine_config())
    metrics = ServerMetrics(engine)
    # PIL's own bomb check (in Image.open) then agrees with the explicit one in server.images
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_engine:
            await engine.start()
        try:
            yield
        finally:
            if owns_engine:
                await engine.stop()

    app = FastAPI(
        title="janus-server",
        version="0.1.0",
        description="DeepSeek Janus: image understanding and text-to-image, native and OpenAI-compatible routes.",
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.started = int(time.time())
    install_error_handlers(app, validation_handler=handle_request_validation_error_after_auth)
    document_limits(app, settings)
    protected = [Depends(require_api_key)]
    app.include_router(routes_ops.router)
    app.include_router(routes_playground.router)
    app.include_router(routes_native.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After", "X-Seed"],
        )
    app.add_middleware(RequestMiddleware, settings=settings, metrics=metrics)
    return app
