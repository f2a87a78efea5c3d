"""The HTTP server around the app: uvicorn with this server's connection limits and exit status.

- A connection must finish its request headers within `header_timeout` seconds of its first byte
  (of the connection, or of each next request on it); else it gets a 408 and is closed, so clients
  that trickle headers (slowloris) cannot hold connections forever. Idle keep-alive connections are
  closed by uvicorn's own keep-alive timeout.
- At most `max_connections` connections are served at once; a request on a connection over the cap
  gets a 503 error body and the connection is closed.
- A SIGTERM (or Ctrl+C) drain that finishes in time exits with status 0; uvicorn itself re-raises
  the signal after shutting down, which a process manager reports as a failure.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_body, error_response, retry_after_headers
from server.settings import Settings

REQUEST_TIMEOUT_STATUS = 408
LINGER_SECONDS = 2.0  # after a 408, how long the client's further bytes are read and dropped


def drain_bound(limit: int) -> int:
    """Bytes of an oversize body read and discarded before it is refused, so that the client, still
    sending, reads the answer (a server that closes with unread bytes resets the connection)."""
    return max(4 * limit, 64 * 1024 * 1024)


async def drain(receive: Receive, bound: int, already: int = 0) -> None:
    """Read and discard the rest of the request body, up to `bound` bytes in all."""
    size = already
    while size <= bound:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def over_capacity_app(max_connections: int) -> ASGIApp:
    """What a request on a connection over the cap is answered with."""
    message = f"The server already has {max_connections} connections open; retry shortly."
    headers = {"Connection": "close", **retry_after_headers(1)}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await drain(receive, drain_bound(0))
        await error_response(503, message, code="too_many_connections", headers=headers)(scope, receive, send)

    return app


def protocol_class(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, with the header timeout and the connection cap."""
    too_many = over_capacity_app(max_connections)
    timeout_body = json.dumps(error_body(
        REQUEST_TIMEOUT_STATUS, f"The request headers did not arrive within {header_timeout:g} seconds.",
        code="header_timeout")).encode()
    timeout_response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + b"content-length: " + str(len(timeout_body)).encode() + b"\r\n\r\n" + timeout_body)

    class Protocol(HttpToolsProtocol):
        header_timer: asyncio.TimerHandle | None = None
        lingering = False  # answered 408: what arrives now is dropped

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.app = too_many
            self.start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.start_header_timer()

        def on_headers_complete(self) -> None:
            self.stop_header_timer()
            super().on_headers_complete()

        def start_header_timer(self) -> None:
            self.stop_header_timer()
            self.header_timer = self.loop.call_later(header_timeout, self.headers_too_slow)

        def stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def data_received(self, data: bytes) -> None:
            if not self.lingering:
                super().data_received(data)

        def headers_too_slow(self) -> None:
            """Answer 408, then close gracefully: stop sending, and read and drop what the client
            still sends for a moment, since closing with bytes unread would reset the connection
            before the client reads the answer."""
            self.header_timer = None
            if self.transport.is_closing():
                return
            self.transport.write(timeout_response)
            self.lingering = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)

    return Protocol


class Server(uvicorn.Server):
    """uvicorn's server; a drain that finished in time is a clean exit, not a re-raised signal."""

    drained = False

    async def _wait_tasks_to_complete(self) -> None:
        await super()._wait_tasks_to_complete()
        self.drained = not self.force_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            if self.drained:
                self._captured_signals.clear()


def uvicorn_config(app: ASGIApp, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn settings `janus-server serve` runs with (and the tests' servers)."""
    values: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        http=protocol_class(settings.header_timeout, settings.max_connections),
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
    )
    return uvicorn.Config(app, **{**values, **options})
