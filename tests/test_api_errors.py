"""Bad input, table-driven: each case checks the status and the whole error body, and the server keeps serving."""
import base64
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest

from conftest import API_KEY, data_url, png_bytes, sse_payloads

IMAGE = base64.b64encode(png_bytes()).decode()
SERVER_BODY_LIMIT = 1_000_000
CHAT_URL = "/v1/chat/completions"


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def understand(**fields: Any) -> dict[str, Any]:
    return {"json": {"question": "What is it?", "max_new_tokens": 2, **fields}}


def chat(content: Any = "Hi", **fields: Any) -> dict[str, Any]:
    return {"json": {"model": "janus-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}}


def image_part(url: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]


def chunked(size: int):
    block = b"x" * 65536
    for _ in range(size // len(block) + 1):
        yield block


@dataclass
class Case:
    name: str
    method: str
    path: str
    request: dict[str, Any]
    status: int
    code: str | None
    param: str | None = None
    error_type: str = "invalid_request_error"
    server: str = "server"
    headers: dict[str, str] = field(default_factory=dict)


CASES = [
    Case("bad base64", "POST", "/understand", understand(image="not base64 at all!"), 400, "invalid_image", "image"),
    Case("data URL without comma", "POST", "/understand", understand(image="data:image/png;base64"),
         400, "invalid_image", "image"),
    Case("data URL not base64", "POST", "/understand", understand(image="data:image/png,rawbytes"),
         400, "invalid_image", "image"),
    Case("data URL of text", "POST", "/understand", understand(image="data:text/plain;base64,aGVsbG8="),
         400, "invalid_image", "image"),
    Case("bytes that are not an image", "POST", "/understand",
         understand(images=[base64.b64encode(b"hello, not an image").decode()]), 400, "invalid_image", "images[0]"),
    Case("truncated PNG", "POST", "/understand",
         understand(image=base64.b64encode(png_bytes(300, 300)[:80]).decode()), 400, "invalid_image", "image"),
    Case("decompression bomb", "POST", "/understand",
         understand(image=base64.b64encode(png_declaring(100_000, 100_000)).decode()),
         400, "image_too_large", "image"),
    Case("image over the pixel limit", "POST", "/understand",
         understand(image=data_url(png_declaring(2100, 2100))), 400, "image_too_large", "image"),
    Case("empty image", "POST", "/understand", understand(image=""), 400, "invalid_image", "image"),
    Case("body over the limit", "POST", "/understand",
         {"content": b"{" + b" " * SERVER_BODY_LIMIT + b"}", "headers": {"Content-Type": "application/json"}},
         413, "body_too_large"),
    Case("chunked body over the limit", "POST", "/understand",
         {"content": chunked(SERVER_BODY_LIMIT), "headers": {"Content-Type": "application/json"}},
         413, "body_too_large"),
    Case("too many images", "POST", "/understand", understand(images=[IMAGE] * 5), 400, "too_many_images", "images"),
    Case("too many multipart images", "POST", "/understand",
         {"data": {"question": "Hi"}, "files": [("image", ("a.png", png_bytes(), "image/png"))] * 5},
         400, "too_many_images", "image"),
    Case("n = 0", "POST", "/generate", {"json": {"prompt": "a cat", "n": 0}}, 400, "invalid_value", "n"),
    Case("n = 17", "POST", "/generate", {"json": {"prompt": "a cat", "n": 17}}, 400, "invalid_value", "n"),
    Case("images n = 17", "POST", "/v1/images/generations", {"json": {"prompt": "a cat", "n": 17}},
         400, "invalid_value", "n"),
    Case("size 512x512", "POST", "/v1/images/generations", {"json": {"prompt": "a cat", "size": "512x512"}},
         400, "invalid_value", "size"),
    Case("negative temperature", "POST", "/understand", understand(temperature=-0.5), 400, "invalid_value",
         "temperature"),
    Case("top_p 0", "POST", "/generate", {"json": {"prompt": "a cat", "top_p": 0}}, 400, "invalid_value", "top_p"),
    Case("negative seed", "POST", "/understand", understand(seed=-1), 400, "invalid_value", "seed"),
    Case("five stop strings", "POST", "/understand", understand(stop=["a", "b", "c", "d", "e"]),
         400, "invalid_value", "stop"),
    Case("max_tokens 0", "POST", CHAT_URL, chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    Case("max_new_tokens over the server limit", "POST", "/understand", understand(max_new_tokens=100_000),
         400, "invalid_value", "max_new_tokens"),
    Case("question over the context", "POST", "/understand", understand(question="zq " * 8000),
         400, "invalid_request", "messages"),
    Case("prompt over the context", "POST", "/generate", {"json": {"prompt": "zq " * 8000}},
         400, "invalid_request", "prompt"),
    Case("prompt over the character limit", "POST", "/generate", {"json": {"prompt": "a" * 70_000}},
         400, "too_long", "prompt"),
    Case("text/plain body", "POST", "/understand",
         {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    Case("form-urlencoded chat body", "POST", CHAT_URL, {"data": {"model": "janus-tiny"}}, 415, "unsupported_media_type"),
    Case("text/plain generate body", "POST", "/generate",
         {"content": b"prompt=a cat", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    Case("text/plain chat body", "POST", CHAT_URL,
         {"content": b'{"messages": []}', "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    Case("body is a list", "POST", "/understand", {"json": [1, 2]}, 400, "invalid_body"),
    Case("body is a number", "POST", "/generate", {"json": 3}, 400, "invalid_body"),
    Case("body is null", "POST", "/understand", {"content": b"null", "headers": {"Content-Type": "application/json"}},
         400, "invalid_body"),
    Case("chat body is a list", "POST", CHAT_URL, {"json": ["hi"]}, 400, "invalid_body"),
    Case("invalid JSON", "POST", "/understand",
         {"content": b'{"question": ', "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    Case("invalid chat JSON", "POST", CHAT_URL,
         {"content": b'{"messages": [}', "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    Case("unknown model", "POST", CHAT_URL, chat(model="gpt-4o"), 404, "model_not_found", "model"),
    Case("unknown image model", "POST", "/v1/images/generations", {"json": {"prompt": "x", "model": "dall-e-3"}},
         404, "model_not_found", "model"),
    Case("unknown model card", "GET", "/v1/models/gpt-4o", {}, 404, "model_not_found", "model"),
    Case("missing question", "POST", "/understand", {"json": {"image": IMAGE}}, 400, "missing_field", "question"),
    Case("missing messages", "POST", CHAT_URL, {"json": {"model": "janus-tiny"}}, 400, "missing_field", "messages"),
    Case("unknown native field", "POST", "/generate", {"json": {"prompt": "x", "guidance": 3}},
         400, "unknown_field", "guidance"),
    Case("wrong multipart file field", "POST", "/understand",
         {"data": {"question": "Hi"}, "files": [("file", ("a.png", png_bytes(), "image/png"))]},
         400, "unknown_field", "file"),
    Case("file sent to /generate", "POST", "/generate",
         {"data": {"prompt": "a cat"}, "files": [("image", ("a.png", png_bytes(), "image/png"))]},
         400, "unknown_field", "image"),
    Case("missing API key", "POST", "/understand", {**understand(), "headers": {"Authorization": ""}},
         401, "missing_api_key", error_type="authentication_error"),
    Case("wrong API key", "POST", CHAT_URL, {**chat(), "headers": {"Authorization": "Bearer wrong"}},
         401, "invalid_api_key", error_type="authentication_error"),
    Case("missing API key, invalid JSON", "POST", CHAT_URL,
         {"content": b'{"messages": [}', "headers": {"Content-Type": "application/json", "Authorization": ""}},
         401, "missing_api_key", error_type="authentication_error"),
    Case("wrong API key, invalid fields", "POST", "/generate",
         {"json": {"prompt": 3, "n": "x"}, "headers": {"Authorization": "Bearer wrong"}},
         401, "invalid_api_key", error_type="authentication_error"),
    Case("unknown route", "GET", "/v1/completions", {}, 404, "not_found"),
    Case("unknown route, POST", "POST", "/understandd", understand(), 404, "not_found"),
    Case("wrong method", "GET", "/understand", {}, 405, "method_not_allowed"),
    Case("wrong method on chat", "PUT", CHAT_URL, chat(), 405, "method_not_allowed"),
    Case("response_format url", "POST", "/v1/images/generations", {"json": {"prompt": "x", "response_format": "url"}},
         400, "invalid_value", "response_format"),
    Case("png with n = 2", "POST", "/generate", {"json": {"prompt": "x", "n": 2, "response_format": "png"}},
         400, "invalid_value", "response_format"),
    Case("png streamed", "POST", "/generate", {"json": {"prompt": "x", "response_format": "png", "stream": True}},
         400, "invalid_value", "response_format"),
    Case("http image URL not allowed", "POST", "/understand", understand(image="http://127.0.0.1:9/cat.png"),
         400, "remote_image_refused", "image"),
    Case("http chat image URL not allowed", "POST", CHAT_URL, chat(image_part("https://example.com/cat.png")),
         400, "remote_image_refused", "messages[0].content[1].image_url"),
    Case("chat bad base64 image", "POST", CHAT_URL, chat(image_part("data:image/png;base64,@@@@")),
         400, "invalid_image", "messages[0].content[1].image_url"),
    Case("loopback image host refused", "POST", "/understand", understand(image="http://127.0.0.1:9/cat.png"),
         400, "remote_image_refused", "image", server="public_images_server"),
    Case("chat n = 2", "POST", CHAT_URL, chat(n=2), 400, "invalid_value", "n"),
    Case("chat logprobs", "POST", CHAT_URL, chat(logprobs=True), 400, "invalid_value", "logprobs"),
    Case("chat ends with the assistant", "POST", CHAT_URL,
         {"json": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}},
         400, "invalid_value", "messages"),
    Case("chat image in a system message", "POST", CHAT_URL,
         {"json": {"messages": [{"role": "system", "content": image_part(data_url(png_bytes()))},
                                {"role": "user", "content": "Hi"}]}},
         400, "invalid_value", "messages[0].content"),
    Case("chat tool role", "POST", CHAT_URL, {"json": {"messages": [{"role": "tool", "content": "x"}]}},
         400, "invalid_value", "messages[0].role"),
    Case("chat part without its field", "POST", CHAT_URL, chat([{"type": "image_url"}]),
         400, "invalid_value", "messages[0].content[0]"),
    Case("placeholders do not match the images", "POST", "/understand",
         understand(image=IMAGE, question="<image_placeholder> and <image_placeholder>?"),
         400, "invalid_value", "question"),
    Case("not ready", "POST", "/understand", understand(), 503, "not_ready",
         error_type="service_unavailable_error", server="unstarted_server"),
    # Eight images (16 rows): janus-tiny draws one in under the 1 s timeout on a fast CPU (an AVX-512 EPYC).
    Case("timeout", "POST", "/generate", {"json": {"prompt": "a slow cat", "n": 8}}, 504, "timeout", "timeout",
         error_type="timeout_error", server="short_timeout_server"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_a_clear_error(request, case: Case):
    live = request.getfixturevalue(case.server)
    with live.client() as http:
        response = http.request(case.method, case.path, **case.request)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == case.error_type
    assert body["error"]["code"] == case.code
    assert body["error"]["param"] == case.param
    assert body["error"]["message"]
    if case.status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    if case.status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if case.status == 405:
        assert "allow" in response.headers


def test_ready_is_503_while_the_engine_is_not_up(unstarted_server):
    with unstarted_server.client(api_key=None) as http:
        response = http.get("/ready")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    assert int(response.headers["retry-after"]) >= 1


def test_a_stream_that_fails_midway_ends_with_an_error_event(short_timeout_server):
    with short_timeout_server.client() as http:
        with http.stream("POST", "/generate", json={"prompt": "a slow cat", "n": 8, "stream": True}) as response:
            assert response.status_code == 200
            events = [json.loads(payload) for payload in sse_payloads(list(response.iter_lines()))]
    assert "step" in events[0]
    assert events[-1]["error"]["code"] == "timeout"
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}


def test_openai_stream_that_fails_midway_sends_error_then_done(short_timeout_server):
    """Near-uniform sampling rarely ends within the 1 s timeout (janus-tiny's 600 tokens hold its end of text:
    a few hundred tokens on average); a seed whose text does end is skipped."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1900,
            "temperature": 2, "stream": True}
    with short_timeout_server.client() as http:
        for seed in range(40):
            with http.stream("POST", CHAT_URL, json={**body, "seed": seed}) as response:
                assert response.status_code == 200
                payloads = sse_payloads(list(response.iter_lines()))
            assert '"role":"assistant"' in payloads[0]
            assert payloads[-1] == "[DONE]"
            last_event = json.loads(payloads[-2])
            if "error" in last_event:
                break
    assert last_event["error"]["code"] == "timeout", payloads[-3:]
    assert set(last_event["error"]) == {"message", "type", "param", "code"}


def test_a_bug_is_a_500_with_the_error_body_and_a_logged_traceback(buggy_server, caplog):
    with buggy_server.client() as http:
        response = http.get("/v1/fail", headers={"X-Request-Id": "bug-1"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == "internal_error"
    assert "bug-1" in response.json()["error"]["message"]
    assert "deliberate bug" not in response.text
    assert any(record.exc_info and "bug-1" in record.getMessage() for record in caplog.records)


def test_server_still_serves_after_bad_input(server, client):
    assert client.get("/health").status_code == 200
    response = client.post("/understand", json={"image": IMAGE, "question": "Hi", "max_new_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    assert API_KEY not in response.text


def test_a_full_queue_answers_429_over_http_and_the_accepted_requests_finish(server_loop, janus_home):
    """Own engine: one request at a time, one waiting place. With both taken, every model route answers 429."""
    import threading
    import time

    from conftest import server_settings

    settings = server_settings(janus_home, max_batch_rows=2, max_running_requests=1, max_queue=1,
                               max_new_tokens_limit=2000)
    live = server_loop.start(settings)
    with live.client() as http:
        deadline = time.monotonic() + 120
        while http.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the overload server never became ready"
            time.sleep(0.1)
        accepted: list[Any] = [None, None]

        def hold(index: int) -> None:  # long enough to keep the row and the queue place taken
            with live.client() as own:
                accepted[index] = own.post("/understand", json={
                    "question": f"Tell a long story number {index}.", "max_new_tokens": 1500,
                    "temperature": 0.0})

        threads = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
        for thread, wanted in zip(threads, ((1, 0), (1, 1))):
            thread.start()
            while (live.engine.stats().running_requests, live.engine.stats().queue_length) != wanted:
                assert time.monotonic() < deadline, live.engine.stats()
                time.sleep(0.01)
        refused = [http.post("/understand", json={"question": "And me?", "max_new_tokens": 2}),
                   http.post("/generate", json={"prompt": "a cat", "seed": 1}),
                   http.post(CHAT_URL, json={"model": "janus-tiny", "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "hi"}]})]
        for thread in threads:
            thread.join(120)
    for response in refused:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "overloaded" and error["message"]
    assert [r.status_code for r in accepted] == [200, 200], [r.text[:200] for r in accepted]
