"""A local HTTP file server for download tests: byte ranges, redirects, and scripted misbehaviour."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """Serves `files` (URL path -> bytes) on 127.0.0.1; the fields script how it misbehaves."""

    files: dict[str, bytes]
    break_after: dict[str, int] = field(default_factory=dict)     # path -> bytes sent before the first GET is cut
    ignore_range: set[str] = field(default_factory=set)           # paths answered 200 whatever the Range
    announced_size: dict[str, int] = field(default_factory=dict)  # path -> size claimed by HEAD and Content-Length
    head_size: dict[str, int] = field(default_factory=dict)       # path -> size claimed by HEAD only
    redirects: dict[str, str] = field(default_factory=dict)       # path -> path it answers 302 to
    linked_size: bool = False                                     # redirects carry X-Linked-Size, as on Hugging Face
    head_supported: bool = True
    chunk_delay: float = 0.0                                      # seconds slept after each 64 KiB sent
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def url(self, path: str = "") -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def record(self, request: Request) -> int:
        """Log a request; returns how many requests with that method and path came so far."""
        with self._lock:
            self.requests.append(request)
            return sum(1 for r in self.requests if (r.method, r.path) == (request.method, request.path))

    def gets(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and path in (None, r.path)]


def _handler_for(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            server.record(Request("HEAD", self.path, dict(self.headers)))
            if self._answered_without_body():
                return
            if not server.head_supported:
                self._empty(405)
                return
            data = server.files[self.path]
            self.send_response(200)
            size = server.head_size.get(self.path, server.announced_size.get(self.path, len(data)))
            self.send_header("Content-Length", str(size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            count = server.record(Request("GET", self.path, dict(self.headers)))
            if self._answered_without_body():
                return
            data = server.files[self.path]
            start = _range_start(self.headers.get("Range"))
            if start is not None and self.path not in server.ignore_range:
                if start >= len(data):
                    self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body, promised = data[start:], len(data) - start
            else:
                self.send_response(200)
                body, promised = data, server.announced_size.get(self.path, len(data))
            self.send_header("Content-Length", str(promised))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if count == 1 and self.path in server.break_after:
                body = body[:server.break_after[self.path]]
            self._send_body(body)
            if len(body) < promised:  # closing is how a short body shows: the client sees the cut
                self.close_connection = True

        def _answered_without_body(self) -> bool:
            if self.path in server.redirects:
                target = server.redirects[self.path]
                headers = {"Location": target}
                if server.linked_size and target in server.files:
                    headers["X-Linked-Size"] = str(len(server.files[target]))
                self._empty(302, headers)
                return True
            if self.path not in server.files:
                self._empty(404)
                return True
            return False

        def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _send_body(self, body: bytes) -> None:
            try:
                for start in range(0, len(body), 1 << 16):
                    self.wfile.write(body[start:start + (1 << 16)])
                    if server.chunk_delay:
                        time.sleep(server.chunk_delay)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler


def _range_start(value: str | None) -> int | None:
    """'bytes=123-' -> 123; the downloader only asks for open-ended ranges."""
    if not value or not value.startswith("bytes="):
        return None
    start = value.removeprefix("bytes=").partition("-")[0]
    return int(start) if start.isdigit() else None
