"""Native routes against the live server: JSON, multipart and streaming, equal to the engine's own results."""
import base64
import io
import json

import numpy as np
from PIL import Image

from conftest import data_url, png_bytes, sse_payloads
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


def test_generate_json_is_the_engines_images(server, client):
    response = client.post("/generate", json={"prompt": "a red square", "n": 2, "seed": 42, "temperature": 1.0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["images"]) == 2
    assert answer["usage"]["images"] == 2
    expected = server.run(server.engine.generate_images(GenerateRequest(prompt="a red square", n=2, seed=42)))
    assert [image["seed"] for image in answer["images"]] == expected.seeds
    for image, array in zip(answer["images"], expected.images):
        assert np.array_equal(pixels(image["b64_json"]), array)


def test_generate_png_and_multipart_agree_for_one_seed(client):
    png = client.post("/generate", json={"prompt": "a blue circle", "seed": 7, "response_format": "png"})
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == "7"
    # (None, value) parts are plain form fields; httpx sends multipart/form-data when `files` is given
    multipart = client.post("/generate", files={"prompt": (None, "a blue circle"), "seed": (None, "7")})
    assert multipart.status_code == 200, multipart.text
    image = multipart.json()["images"][0]
    assert image["seed"] == 7
    assert np.array_equal(pixels(image["b64_json"]), np.asarray(rgb(png.content)))


def test_generate_stream_reports_progress_then_the_images(client):
    with client.stream("POST", "/generate", json={"prompt": "a green tree", "seed": 5, "stream": True}) as response:
        assert response.status_code == 200
        events = [json.loads(payload) for payload in sse_payloads(list(response.iter_lines()))]
    *progress, final = events
    assert progress, "no progress events"
    steps = [event["step"] for event in progress]
    assert steps == sorted(steps) and steps[-1] <= 576
    assert {event["total"] for event in progress} == {576}
    assert len(final["images"]) == 1 and final["images"][0]["seed"] == 5
    pixels(final["images"][0]["b64_json"])


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
