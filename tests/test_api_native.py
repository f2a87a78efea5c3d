"""Native routes against the live server: JSON, multipart, URL-encoded forms and streaming, equal to the engine's own results."""
import asyncio
import base64
import io
import json
import shutil
import subprocess
import time

import httpx

import numpy as np
import pytest
from PIL import Image

from conftest import API_KEY, GENERATE_PROMPT, data_url, png_bytes, sse_payloads
from server.engine.types import GenerateRequest, UnderstandRequest

QUESTION = "What is in this picture?"


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pixels(b64_png: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64_png)))
    assert image.size == (384, 384)
    return np.asarray(image.convert("RGB"))


def test_understand_json_is_the_engines_greedy_answer(server, client, golden_png):
    response = client.post("/understand", json={"image": data_url(golden_png), "question": QUESTION, "max_new_tokens": 12})
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = server.run(server.engine.understand(UnderstandRequest(
        messages=[{"role": "user", "content": QUESTION, "images": 1}], images=[rgb(golden_png)], max_new_tokens=12,
    )))
    assert answer["text"] == expected.text
    assert answer["finish_reason"] == expected.finish_reason
    assert answer["usage"]["completion_tokens"] == expected.usage.completion_tokens
    assert answer["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert answer["usage"]["total_tokens"] == expected.usage.total_tokens
    assert set(answer["timings"]) >= {"queue", "prefill", "decode", "total", "first_token"}
    assert answer["id"] == response.headers["x-request-id"]


def test_understand_sampling_with_a_seed_is_the_engines(server, client, image_png):
    body = {"images": [base64.b64encode(image_png).decode()], "question": "Describe it.", "max_new_tokens": 10,
            "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    first = client.post("/understand", json=body).json()
    again = client.post("/understand", json=body).json()
    expected = server.run(server.engine.understand(UnderstandRequest(
        messages=[{"role": "user", "content": "Describe it.", "images": 1}], images=[rgb(image_png)],
        max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
    )))
    assert first["text"] == again["text"] == expected.text


def test_understand_multipart_equals_json(client, image_png, golden_png):
    fields = {"question": QUESTION, "max_new_tokens": "8", "system_prompt": "Answer briefly."}
    files = [("image", ("a.png", image_png, "image/png")), ("image", ("b.png", golden_png, "image/png"))]
    multipart = client.post("/understand", data=fields, files=files)
    assert multipart.status_code == 200, multipart.text
    as_json = client.post("/understand", json={
        "images": [data_url(image_png), data_url(golden_png)], "question": QUESTION, "max_new_tokens": 8,
        "system_prompt": "Answer briefly.",
    })
    assert multipart.json()["text"] == as_json.json()["text"]
    assert multipart.json()["usage"] == as_json.json()["usage"]


def test_understand_without_images(client):
    response = client.post("/understand", json={"question": "Say something.", "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    assert 1 <= response.json()["usage"]["completion_tokens"] <= 4


def test_understand_stream_sends_the_same_text_then_a_final_event(client, golden_png):
    body = {"image": data_url(golden_png), "question": QUESTION, "max_new_tokens": 12}
    expected = client.post("/understand", json=body).json()
    with client.stream("POST", "/understand", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(payload) for payload in sse_payloads(list(response.iter_lines()))]
    *pieces, final = events
    assert all(set(piece) == {"id", "text"} for piece in pieces)
    assert "".join(piece["text"] for piece in pieces) == expected["text"]
    assert final["finish_reason"] == expected["finish_reason"]
    assert final["usage"] == expected["usage"]
    assert "total" in final["timings"]


def test_understand_stop_string_ends_the_text(client, golden_png):
    body = {"image": data_url(golden_png), "question": QUESTION, "max_new_tokens": 12}
    full = client.post("/understand", json=body).json()["text"]
    stop = full[len(full) // 2:][:2]
    if not stop.strip():
        stop = full[-1]
    stopped = client.post("/understand", json={**body, "stop": [stop]}).json()
    assert stopped["finish_reason"] == "stop"
    assert stop not in stopped["text"]
    assert full.startswith(stopped["text"])


def test_generate_json_answer(generated):
    assert len(generated["images"]) == 2
    assert generated["usage"]["images"] == 2
    first, second = (pixels(image["b64_json"]) for image in generated["images"])
    assert generated["images"][0]["seed"] == 42
    assert not np.array_equal(first, second), "two samples of one request came out identical"


def test_an_images_seed_gives_it_again_through_the_engine(server, generated):
    image = generated["images"][1]
    expected = server.run(server.engine.generate_images(GenerateRequest(prompt=GENERATE_PROMPT, seed=image["seed"])))
    assert expected.seeds == [image["seed"]]
    assert np.array_equal(pixels(image["b64_json"]), expected.images[0])


def test_generate_multipart_png(client, generated):
    image = generated["images"][0]
    # (None, value) parts are plain form fields; httpx sends multipart/form-data when `files` is given
    fields = {"prompt": GENERATE_PROMPT, "seed": str(image["seed"]), "response_format": "png"}
    response = client.post("/generate", files={name: (None, value) for name, value in fields.items()})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == str(image["seed"])
    assert np.array_equal(np.asarray(rgb(response.content)), pixels(image["b64_json"]))


def test_generate_from_a_url_encoded_form(server, generated):
    """`curl -d prompt=...` and HTML forms send application/x-www-form-urlencoded: served like multipart."""
    image = generated["images"][0]
    fields = {"prompt": GENERATE_PROMPT, "seed": str(image["seed"]), "response_format": "png"}
    curl = shutil.which("curl")
    if curl:  # the real thing, as the README shows it
        command = [curl, "-sS", "-o", "-", "-w", "\n%{http_code} %{content_type}", "-H", f"Authorization: Bearer {API_KEY}",
                   *(arg for name, value in fields.items() for arg in ("-d", f"{name}={value}")), f"{server.base_url}/generate"]
        body, _, status = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout.rpartition(b"\n")
        assert status.decode() == "200 image/png", body[:500]
    else:
        with server.client() as http:
            response = http.post("/generate", data=fields)
        assert response.status_code == 200, response.text[:500]
        body = response.content
    assert np.array_equal(np.asarray(rgb(body)), pixels(image["b64_json"]))


def test_understand_from_a_url_encoded_form_equals_json(client):
    fields = {"question": "Say something.", "max_new_tokens": "6"}
    form = client.post("/understand", data=fields)
    assert form.status_code == 200, form.text[:500]
    as_json = client.post("/understand", json={"question": "Say something.", "max_new_tokens": 6})
    assert form.json()["text"] == as_json.json()["text"]


def test_generate_stream_reports_progress_then_the_images(client, generated):
    image = generated["images"][0]
    body = {"prompt": GENERATE_PROMPT, "seed": image["seed"], "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(payload) for payload in sse_payloads(list(response.iter_lines()))]
    *progress, final = events
    assert progress, "no progress events"
    steps = [event["step"] for event in progress]
    assert steps == sorted(steps) and steps[-1] <= 576
    assert {event["total"] for event in progress} == {576}
    assert [streamed["seed"] for streamed in final["images"]] == [image["seed"]]
    assert np.array_equal(pixels(final["images"][0]["b64_json"]), pixels(image["b64_json"]))
    assert final["usage"]["images"] == 1


def test_generate_stream_with_previews(client, generated):
    """preview_every=100: the events of steps 100..500 carry a 24x24 preview per image, grey where no token
    is sampled yet, each the last one's pixels plus new ones; the images are the same as without previews."""
    body = {"prompt": GENERATE_PROMPT, "n": 2, "seed": 42, "stream": True, "preview_every": 100}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(payload) for payload in sse_payloads(list(response.iter_lines()))]
    *progress, final = events
    with_previews = [event for event in progress if "previews" in event]
    assert [event["step"] for event in with_previews] == [100, 200, 300, 400, 500]
    earlier = None
    for event in with_previews:
        grids = [np.asarray(rgb(base64.b64decode(preview))).reshape(576, 3) for preview in event["previews"]]
        assert len(grids) == 2
        for index, grid in enumerate(grids):
            assert (grid[event["step"]:] == 128).all(), "tokens not sampled yet are grey"
            assert not (grid[:event["step"]] == 128).all(axis=1).all()
            if earlier is not None:
                assert np.array_equal(grid[:event["step"] - 100], earlier[index][:event["step"] - 100])
        earlier = grids
    for streamed, plain in zip(final["images"], generated["images"]):
        assert np.array_equal(pixels(streamed["b64_json"]), pixels(plain["b64_json"]))


def test_previews_need_a_stream(client):
    response = client.post("/generate", json={"prompt": "a cat", "preview_every": 10})
    assert response.status_code == 400 and response.json()["error"]["param"] == "preview_every"


def test_edge_parameter_values_are_served(client):
    edges = {"seed": 2**63 - 1, "top_k": 10**9, "top_p": 1e-6, "temperature": 2.0}
    understood = client.post("/understand", json={"question": "Hi", "max_new_tokens": 3, **edges})
    assert understood.status_code == 200, understood.text[:500]
    drawn = client.post("/generate", json={"prompt": "x", "cfg_weight": 0, "response_format": "png", **edges})
    assert drawn.status_code == 200, drawn.text[:500]
    assert drawn.headers["x-seed"] == str(2**63 - 1)


def test_request_id_is_echoed_or_created(client):
    echoed = client.post("/understand", json={"question": "Hi", "max_new_tokens": 1}, headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    created = client.get("/health")
    assert created.headers["x-request-id"]
    unsafe = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"


def test_small_images_of_every_mode_are_accepted(client):
    for mode in ("L", "RGBA", "P", "CMYK"):
        buffer = io.BytesIO()
        Image.new(mode, (20, 30)).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
        response = client.post("/understand", json={"image": base64.b64encode(buffer.getvalue()).decode(),
                                                    "question": "Hi", "max_new_tokens": 1})
        assert response.status_code == 200, (mode, response.text)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png_bytes())).save(jpeg, format="JPEG")
    response = client.post("/understand", json={"image": data_url(jpeg.getvalue(), "image/jpeg"),
                                                "question": "Hi", "max_new_tokens": 1})
    assert response.status_code == 200, response.text


def running_requests(server) -> int:
    async def read() -> int:
        return server.engine.stats().running_requests

    return server.run(read())


def wait_until_idle(server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_requests(server) == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_goes_away_cancels_its_engine_request(server, stream):
    """An n=2 generation takes seconds; the client leaves after its first second and the engine drops it."""

    async def leave_early() -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"prompt": "a long walk", "n": 2, "stream": stream}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as http:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    async with http.stream("POST", "/generate", json=body) as response:
                        async for _ in response.aiter_lines():
                            pass

    assert wait_until_idle(server, timeout=30)
    asyncio.run(leave_early())
    assert wait_until_idle(server, timeout=3), "the engine kept running a request nobody waits for"
