"""The model reproduces the official implementation on the golden tiny checkpoint (see golden/janus-tiny/README.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle
import pytest

from model.generation import to_uint8_images

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
ATOL = 1e-4


@pytest.fixture(scope="module")
def cases():
    with np.load(GOLDEN / "cases.npz") as data:
        return {name: data[name] for name in data.files}


def assert_close(actual, expected, atol=ATOL):
    actual = actual.numpy() if hasattr(actual, "numpy") else np.asarray(actual)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def assert_images_close(actual: np.ndarray, expected: np.ndarray):
    # The uint8 conversion truncates: a value on an integer boundary may flip by one.
    assert actual.shape == expected.shape and actual.dtype == np.uint8
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.001 * diff.size


@pytest.mark.parametrize("attention", ["numpy", "paddle"])
def test_siglip_features_and_aligner(model, cases, attention, monkeypatch, linear_path):
    """On CPU float32 the attention runs in numpy (model/cpu_attention.py); elsewhere in Paddle. Both match."""
    import model.llama as llama

    monkeypatch.setattr(llama, "CPU_NUMPY_ATTENTION", attention == "numpy")
    pixels = cases["preprocess.pixel_values"]
    assert_close(model.vision_model(paddle.to_tensor(pixels)), cases["siglip.vision_features"])
    assert_close(model.encode_images(pixels), cases["siglip.aligner_output"])


@pytest.mark.parametrize("conv", ["conv1", "conv2"])
def test_image_features_merge_into_token_embeddings(model, cases, conv):
    p = f"understanding.{conv}."
    pixels = cases[p + "pixel_values"].reshape(-1, 3, 384, 384)
    embeds = model.embed_with_images(cases[p + "input_ids"], cases[p + "images_seq_mask"], pixels)
    assert_close(embeds, cases[p + "inputs_embeds"])


@pytest.fixture(params=["paddle", "numpy"])
def linear_path(request, monkeypatch):
    """The LM's projections through Paddle, or all through numpy's BLAS (on CPU float32 the large ones
    of the full-size model go there, see llama.linear); yields the count of numpy products."""
    import contextlib

    import model.llama as llama

    products = []
    if request.param == "paddle":
        monkeypatch.setattr(llama, "CPU_NUMPY_LINEAR", False)
    else:
        monkeypatch.setattr(llama, "NUMPY_LINEAR_MIN_WEIGHTS", 0)
        real = llama.cpu_blas.gemm

        @contextlib.contextmanager
        def counted():
            products.append(1)
            with real():
                yield

        monkeypatch.setattr(llama.cpu_blas, "gemm", counted)
    yield request.param, products
    assert bool(products) == (request.param == "numpy")


@pytest.mark.parametrize("conv", ["conv1", "conv2"])
def test_understanding_prefill_and_greedy_decode(model, cases, conv, linear_path):
    p = f"understanding.{conv}."
    embeds = cases[p + "inputs_embeds"]
    length = embeds.shape[1]
    generated = cases[p + "generated_ids"][0]
    step_logits = cases[p + "step_logits"]
    cache = model.new_cache(1, length + len(generated))

    logits = model.text_logits(model.forward_hidden(embeds, cache, [0], [0])).numpy()
    assert_close(logits, cases[p + "prefill_logits"])
    assert_close(logits[0, -1], step_logits[0])
    for i in range(1, len(generated)):
        hidden = model.forward_hidden(model.embed_tokens(generated[None, i - 1 : i]), cache, [0], [length + i - 1])
        logits = model.text_logits(hidden).numpy()[0, 0]
        assert_close(logits, step_logits[i])
        assert logits.argmax() == generated[i]


def test_chunked_prefill_matches_one_pass(model, cases):
    p = "understanding.conv1."
    embeds = cases[p + "inputs_embeds"]
    cache = model.new_cache(1, embeds.shape[1])
    first = model.forward_hidden(embeds[:, :300], cache, [0], [0])
    second = model.forward_hidden(embeds[:, 300:], cache, [0], [300])
    assert_close(model.text_logits(first), cases[p + "prefill_logits"][:, :300])
    assert_close(model.text_logits(second), cases[p + "prefill_logits"][:, 300:])


def test_understanding_batch_rows_in_own_cache_slots(model, cases, linear_path):
    b = "understanding_batch."
    mask = cases[b + "attention_mask"].astype(bool)
    generated = cases[b + "generated_ids"]
    steps = generated.shape[1]
    rows = []
    for row, conv in enumerate(["conv1", "conv2"]):
        p = f"understanding.{conv}."
        # The reference left-pads the batch; here each row lives unpadded in its own cache slot.
        np.testing.assert_array_equal(cases[b + "input_ids"][row][mask[row]], cases[p + "input_ids"][0])
        rows.append(cases[p + "inputs_embeds"])
    lengths = [r.shape[1] for r in rows]
    slots = [2, 0]  # not the identity, so the cache is read through a slot gather
    cache = model.new_cache(3, max(lengths) + steps)
    for row, (embeds, slot) in enumerate(zip(rows, slots)):
        last = model.text_logits(model.forward_hidden(embeds, cache, [slot], [0])[:, -1]).numpy()
        assert_close(last[0], cases[b + "last_logits"][row])
    for i in range(1, steps):
        embeds = model.embed_tokens(generated[:, i - 1 : i])
        start = [n + i - 1 for n in lengths]
        logits = model.text_logits(model.forward_hidden(embeds, cache, slots, start)).numpy()[:, 0]
        assert_close(logits, cases[b + "step_logits"][i])
        np.testing.assert_array_equal(logits.argmax(-1), generated[:, i])


def test_generation_prompt_embeddings_and_first_step(model, cases, linear_path):
    g = "generation."
    ids = cases[g + "input_ids"].astype(np.int64)
    embeds = model.embed_tokens(ids)
    assert_close(embeds, cases[g + "prompt_inputs_embeds"])
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 1)
    logits = model.image_logits(model.forward_hidden(embeds, cache, np.arange(4), np.zeros(4))[:, -1]).numpy()
    cond, uncond = logits[0::2], logits[1::2]
    assert_close(cond, cases[g + "step0_logits_cond"])
    assert_close(uncond, cases[g + "step0_logits_uncond"])
    assert_close(uncond + 5 * (cond - uncond), cases[g + "step0_logits_cfg"])
    first_tokens = np.repeat(cases[g + "image_tokens"][:, 0], 2)
    assert_close(model.embed_image_tokens(first_tokens), cases[g + "step1_img_embeds"])


def test_generation_cfg_loop_teacher_forced(model, cases, linear_path):
    g = "generation."
    ids = cases[g + "input_ids"].astype(np.int64)
    tokens = cases[g + "image_tokens"].astype(np.int64)
    expected = cases[g + "cfg_logits_all_steps"]
    rows, length = ids.shape
    num_tokens = tokens.shape[1]
    cache = model.new_cache(rows, length + num_tokens)
    slots = np.arange(rows)
    hidden = model.forward_hidden(model.embed_tokens(ids), cache, slots, np.zeros(rows))[:, -1:]
    cfg_logits = np.empty_like(expected)
    for step in range(num_tokens):
        logits = model.image_logits(hidden).numpy()[:, 0]
        cond, uncond = logits[0::2], logits[1::2]
        cfg_logits[:, step] = uncond + 5 * (cond - uncond)
        if step + 1 < num_tokens:
            embeds = model.embed_image_tokens(np.repeat(tokens[:, step], 2)[:, None])
            hidden = model.forward_hidden(embeds, cache, slots, np.full(rows, length + step))
    assert_close(cfg_logits, expected)
    np.testing.assert_array_equal(cfg_logits.argmax(-1), tokens)


def test_vq_codebook_lookup(model, cases):
    quant = model.gen_vision_model.lookup(paddle.to_tensor(cases["vq_decode.codes"]))
    assert_close(quant, cases["vq_decode.quant"])


def test_vq_decode_and_uint8_images(model, cases):
    generated = cases["generation.image_tokens"].astype(np.int64)
    # Greedy generation gives both images the same codes (see the golden README): decode that row once.
    np.testing.assert_array_equal(generated[0], generated[1])
    codes = np.concatenate([cases["vq_decode.codes"], generated[:1]])
    decoded = model.decode_image_tokens(codes).numpy()
    assert decoded.dtype == np.float32
    assert_close(decoded[:2], cases["vq_decode.decoded"])
    assert_close(decoded[[2, 2]], cases["generation.decoded"])
    images = to_uint8_images(decoded)
    assert_images_close(images[:2], cases["vq_decode.images_uint8"])
    assert_images_close(images[[2, 2]], cases["generation.images_uint8"])
