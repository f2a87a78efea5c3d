"""OpenAI-compatible routes driven by the unmodified `openai` SDK against the live server."""
import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from conftest import API_KEY, GENERATE_PROMPT, MODEL_ID, data_url
from server.engine.types import UnderstandRequest


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def image_message(url: str, question: str) -> dict:
    return {"role": "user", "content": [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": url}},
    ]}


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_models_list_and_retrieve(sdk):
    models = sdk.models.list()
    assert [model.id for model in models.data] == [MODEL_ID]
    assert sdk.models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_with_an_image_equals_the_native_route(sdk, client, golden_png):
    completion = sdk.chat.completions.create(
        model=MODEL_ID, messages=[image_message(data_url(golden_png), "What is shown?")], max_tokens=10, temperature=0,
    )
    native = client.post("/understand", json={"image": data_url(golden_png), "question": "What is shown?",
                                              "max_new_tokens": 10}).json()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL_ID
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == native["text"]
    assert choice.finish_reason == native["finish_reason"]
    assert completion.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == native["usage"]["completion_tokens"]
    assert completion.usage.total_tokens == native["usage"]["total_tokens"]


def test_chat_penalties_reach_the_engine_as_on_the_native_route(sdk, client, golden_png):
    def chat(**penalties):
        return sdk.chat.completions.create(
            model=MODEL_ID, messages=[image_message(data_url(golden_png), "What is shown?")], max_tokens=16,
            temperature=0, **penalties,
        ).choices[0].message.content

    # Negative: the tiny model's greedy answer barely repeats itself, so only a reward for repeating shows.
    penalized = chat(presence_penalty=-2.0, frequency_penalty=-1.0)
    native = client.post("/understand", json={"image": data_url(golden_png), "question": "What is shown?",
                                              "max_new_tokens": 16, "presence_penalty": -2.0,
                                              "frequency_penalty": -1.0}).json()
    assert penalized == native["text"]
    assert penalized != chat()
    assert chat(presence_penalty=0, frequency_penalty=0) == chat()


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]),
    ("functions", [{"name": "lookup", "parameters": {"type": "object"}}]),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("logit_bias", {"42": 5}),
    ("modalities", ["text", "audio"]),
])
def test_chat_refuses_what_would_change_the_answer_it_cannot_give(sdk, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                    **{field: value})
    assert refused.value.param == field
    assert "not supported" in refused.value.message


def test_chat_accepts_the_harmless_forms_of_those_fields(sdk):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for options in ({"tools": [tool], "tool_choice": "none"}, {"response_format": {"type": "text"}},
                    {"logit_bias": {}}, {"tools": []}, {"modalities": ["text"]}):
        completion = sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, **options)
        assert completion.choices[0].finish_reason in ("stop", "length")


def test_chat_system_and_multi_turn_messages_reach_the_engine(server, sdk):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
    ]
    completion = sdk.chat.completions.create(messages=messages, model=MODEL_ID, max_tokens=6, temperature=0)
    expected = server.run(server.engine.understand(UnderstandRequest(
        messages=[{"role": "user", "content": "Hello there", "images": 0},
                  {"role": "assistant", "content": "Hi", "images": 0},
                  {"role": "user", "content": "And now?", "images": 0}],
        system_prompt="You answer in one word.", max_new_tokens=6,
    )))
    assert completion.choices[0].message.content == expected.text
    assert completion.usage.prompt_tokens == expected.usage.prompt_tokens


def test_chat_samples_at_openais_default_temperature_with_a_seed(server, sdk, image_png):
    messages = [image_message(data_url(image_png), "Describe it.")]
    first = sdk.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, seed=99)
    again = sdk.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, seed=99)
    expected = server.run(server.engine.understand(UnderstandRequest(
        messages=[{"role": "user", "content": "Describe it.", "images": 1}], images=[rgb(image_png)],
        max_new_tokens=8, temperature=1.0, seed=99,
    )))
    assert first.choices[0].message.content == again.choices[0].message.content == expected.text


def test_chat_stream_with_usage(sdk, golden_png):
    messages = [image_message(data_url(golden_png), "What is shown?")]
    expected = sdk.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0)
    chunks = list(sdk.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, last_choice_chunk, usage_chunk = chunks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in content_chunks)
    assert text == expected.choices[0].message.content
    assert last_choice_chunk.choices[0].finish_reason == expected.choices[0].finish_reason
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == expected.usage.completion_tokens


def test_chat_stream_without_usage(sdk):
    chunks = list(sdk.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True, seed=1,
    ))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.usage is None for chunk in chunks)


def test_images_generate_equals_native_generate(sdk, generated):
    image = generated["images"][1]
    result = sdk.images.generate(prompt=GENERATE_PROMPT, n=1, size="384x384", response_format="b64_json",
                                 extra_body={"seed": image["seed"], "guidance_scale": 5.0})
    assert len(result.data) == 1
    drawn = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert drawn.size == (384, 384)
    native = Image.open(io.BytesIO(base64.b64decode(image["b64_json"])))
    assert np.array_equal(np.asarray(drawn), np.asarray(native))


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_images_in_jpeg_or_webp_are_the_png_image_compressed(sdk, generated, image_format):
    image = generated["images"][1]
    native = np.asarray(rgb(base64.b64decode(image["b64_json"])), np.int16)
    sizes = {}
    for quality in (95, 30):
        result = sdk.images.generate(prompt=GENERATE_PROMPT, n=1, output_format=image_format, output_compression=quality,
                                     extra_body={"seed": image["seed"], "guidance_scale": 5.0})
        data = base64.b64decode(result.data[0].b64_json)
        drawn = Image.open(io.BytesIO(data))
        assert drawn.format == image_format.upper() and drawn.size == (384, 384)
        error = np.abs(np.asarray(drawn.convert("RGB"), np.int16) - native).mean()
        assert 0 < error < (12 if quality == 95 else 40)
        sizes[quality] = len(data)
    assert sizes[30] < sizes[95]


@pytest.mark.parametrize("options, param", [
    ({"output_compression": 50}, "output_compression"),
    ({"output_format": "png", "output_compression": 50}, "output_compression"),
    ({"background": "transparent"}, "background"),
    ({"output_format": "gif"}, "output_format"),
])
def test_images_refuse_formats_and_backgrounds_they_cannot_give(sdk, options, param):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.images.generate(prompt="x", **options)
    assert refused.value.param == param


def test_sdk_raises_the_matching_errors(server, sdk):
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad_size:
        sdk.images.generate(prompt="x", size="1024x1024")
    assert bad_size.value.param == "size"
    wrong_key = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_chat_accepts_a_request_without_model_and_a_bare_image_url_string(client, image_png):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": data_url(image_png)}, {"type": "text", "text": "Hi"}]}], "max_tokens": 2})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_remote_image_url_is_fetched_when_allowed(remote_image_server, image_host):
    body = {"messages": [image_message(f"{image_host}/image.png", "Hi")], "max_tokens": 2}
    with remote_image_server.client() as http:
        fetched = http.post("/v1/chat/completions", json=body)
        redirected = http.post("/understand", json={"image": f"{image_host}/redirect", "question": "Hi"})
        missing = http.post("/understand", json={"image": f"{image_host}/missing.png", "question": "Hi"})
    assert fetched.status_code == 200, fetched.text[:500]
    assert redirected.status_code == 400 and redirected.json()["error"]["code"] == "remote_image_failed"
    assert missing.status_code == 400 and "404" in missing.json()["error"]["message"]
