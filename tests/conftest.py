from __future__ import annotations

import os

# before anything imports paddle, which otherwise pins one thread
os.environ.setdefault("OMP_NUM_THREADS", "2")

import asyncio  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Coroutine, Iterator  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.engine.client import EngineClient
    from server.settings import Settings

API_KEY = "test-key"
MODEL_ID = "janus-tiny"
GENERATE_PROMPT = "a red square on a white table"
GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
GOLDEN_IMAGES = GOLDEN / "images"
ENGINE_READY_TIMEOUT = 300


@pytest.fixture(scope="module")
def golden():
    """The official implementation's outputs for janus-tiny: (cases.npz, cases.json)."""
    import json

    import numpy as np

    return np.load(GOLDEN / "cases.npz"), json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def model():
    """janus-tiny, loaded once per test module (a module may define its own `model` instead)."""
    from model.loader import load_model

    return load_model(GOLDEN)


def png_bytes(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def sse_payloads(lines: list[str]) -> list[str]:
    """The `data:` payloads of a Server-Sent Events body, in order."""
    return [line.removeprefix("data:").strip() for line in lines if line.startswith("data:")]


@dataclass
class LiveServer:
    base_url: str
    app: FastAPI
    servers: ServerLoop

    @property
    def engine(self) -> EngineClient:
        return self.app.state.engine

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 300) -> Any:
        """Run a coroutine on the servers' event loop (where the engine lives)."""
        return self.servers.run(coro, timeout)

    def client(self, api_key: str | None = API_KEY, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)


class ServerLoop:
    """Real uvicorn servers on free 127.0.0.1 ports, all in one background event loop, so that extra
    servers with other settings can share the first server's engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self.thread.start()
        self.running: list[tuple[uvicorn.Server, asyncio.Future]] = []

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(
        self, settings: Settings, engine: EngineClient | None = None, customize: Callable[[FastAPI], None] | None = None
    ) -> LiveServer:
        """Serve create_app(settings, engine); `customize` may add routes before it serves."""
        from server.app import create_app
        from server.http import Server, uvicorn_config

        app = create_app(settings, engine)
        if customize is not None:
            customize(app)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = Server(uvicorn_config(app, settings, lifespan="on", timeout_graceful_shutdown=10))
        serving = asyncio.run_coroutine_threadsafe(server.serve(sockets=[listener]), self.loop)
        self.running.append((server, serving))
        self.run(wait_until_started(server), timeout=60)
        return LiveServer(f"http://127.0.0.1:{port}", app, self)

    def stop(self) -> None:
        for server, serving in reversed(self.running):
            server.should_exit = True
            serving.result(timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def wait_until_started(server: uvicorn.Server) -> None:
    while not server.started:
        await asyncio.sleep(0.02)


def server_settings(home: Path, **overrides: Any) -> Settings:
    from server.settings import Settings

    values: dict[str, Any] = dict(
        model=MODEL_ID,
        home=str(home),
        devices=["cpu"],
        api_key=API_KEY,
        max_body_bytes=1_000_000,
        max_images=4,
        max_image_pixels=2048 * 2048,
        max_new_tokens_limit=256,
        request_timeout=120,
        log_json=True,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def janus_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("janus-home")


@pytest.fixture(scope="session")
def server_loop() -> ServerLoop:
    servers = ServerLoop()
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def server(server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """The main server: janus-tiny on CPU, an API key, a 1 MB body limit; it owns the engine."""
    live = server_loop.start(server_settings(janus_home))
    live.run(live.engine.wait_ready(timeout=ENGINE_READY_TIMEOUT), timeout=ENGINE_READY_TIMEOUT + 10)
    return live


@pytest.fixture(scope="session")
def remote_image_server(server: LiveServer, server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """Shares the engine; fetches http(s) image URLs, loopback hosts included."""
    settings = server_settings(janus_home, allow_remote_images=True, allow_private_image_hosts=True)
    return server_loop.start(settings, engine=server.engine)


@pytest.fixture(scope="session")
def public_images_server(server: LiveServer, server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """Shares the engine; fetches http(s) image URLs of public hosts only."""
    settings = server_settings(janus_home, allow_remote_images=True)
    return server_loop.start(settings, engine=server.engine)


@pytest.fixture(scope="session")
def unstarted_server(server: LiveServer, server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """An engine that was never started: /ready and every model route answer 503."""
    from server.engine.client import EngineClient

    settings = server_settings(janus_home)
    return server_loop.start(settings, engine=EngineClient(settings.engine_config()))


@pytest.fixture(scope="session")
def short_timeout_server(server: LiveServer, server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """Shares the engine; requests time out after a second, before an image or 1900 tokens are done."""
    settings = server_settings(janus_home, request_timeout=1.0, max_new_tokens_limit=1900)
    return server_loop.start(settings, engine=server.engine)


def add_failing_route(app: FastAPI) -> None:
    async def fail() -> None:
        raise RuntimeError("a deliberate bug")

    app.add_api_route("/v1/fail", fail, methods=["GET"])


@pytest.fixture(scope="session")
def buggy_server(server: LiveServer, server_loop: ServerLoop, janus_home: Path) -> LiveServer:
    """Shares the engine; GET /v1/fail raises, as a bug would; CORS allows http://allowed.example."""
    settings = server_settings(janus_home, cors_origins=["http://allowed.example"])
    return server_loop.start(settings, engine=server.engine, customize=add_failing_route)


class ImageHostHandler(BaseHTTPRequestHandler):
    """/image.png, /redirect (to it) and anything else 404."""

    def do_GET(self) -> None:
        if self.path == "/image.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def image_host() -> Iterator[str]:
    """Base URL of a local HTTP server holding a PNG."""
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHostHandler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http_server.server_address[1]}"
    http_server.shutdown()
    http_server.server_close()


@pytest.fixture(scope="session")
def client(server: LiveServer) -> httpx.Client:
    with server.client() as http:
        yield http


@pytest.fixture(scope="session")
def image_png() -> bytes:
    return png_bytes()


@pytest.fixture(scope="session")
def golden_png() -> bytes:
    return (GOLDEN_IMAGES / "img0_rgb_300x200.png").read_bytes()


@pytest.fixture(scope="session")
def generated(client: httpx.Client) -> dict[str, Any]:
    """One /generate answer (n=2, seed 42); image generation is slow on CPU, so tests compare against it."""
    response = client.post("/generate", json={"prompt": GENERATE_PROMPT, "n": 2, "seed": 42})
    assert response.status_code == 200, response.text[:500]
    return response.json()
