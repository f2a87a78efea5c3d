"""The OpenVINO image encoder (model/cpu_vision.py) against the official implementation (golden set)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from model.cpu_vision import CpuVisionEncoder
from model.generation import DecodeBatch
from model.loader import load_model

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


@pytest.fixture(scope="module")
def encoder(model):
    return CpuVisionEncoder(model, threads=2, single_thread_copy=True)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "cases.npz") as data:
        arrays = {name: data[name] for name in data.files}
    return arrays, json.loads((GOLDEN / "cases.json").read_text())


def test_features_match_the_reference(encoder, golden):
    arrays, _ = golden
    pixels, want = arrays["preprocess.pixel_values"], arrays["siglip.aligner_output"]
    assert want.ndim == 3 and want.shape[0] == pixels.shape[0]
    for single in (False, True):
        np.testing.assert_allclose(encoder.encode(pixels, single_thread=single), want, rtol=0, atol=1e-4)
    features = encoder.encode_images(paddle.to_tensor(pixels[-1:]))  # batch size changes freely
    assert isinstance(features, paddle.Tensor)
    np.testing.assert_allclose(features.numpy(), want[-1:], rtol=0, atol=1e-4)


def test_rejects_wrong_pixel_shapes(encoder):
    for shape in [(3, 384, 384), (1, 3, 224, 224), (1, 1, 384, 384)]:
        with pytest.raises(ValueError, match="pixel_values must be"):
            encoder.encode(np.zeros(shape, np.float32))


def test_refuses_a_half_precision_model():
    from types import SimpleNamespace

    half = SimpleNamespace(vision_model=SimpleNamespace(pos_embed=paddle.zeros([1], "float16")), aligner=None)
    with pytest.raises(ValueError, match="float32 only"):
        CpuVisionEncoder(half)


@pytest.mark.parametrize("case", ["conv1", "conv2"])
def test_understanding_through_the_encoder_matches_the_reference(model, encoder, golden, case):
    """A prefill whose images go through the program: the reference's prefill logits and greedy tokens."""
    arrays, cases = golden
    batch = DecodeBatch(model, slots=2, max_len=2048, encode_images=encoder.encode_images)
    p = f"understanding.{case}."
    ids = arrays[p + "input_ids"][0]
    slot = batch.reserve_text(len(ids), 24)
    logits = batch.prefill_text(slot, ids, image_mask=arrays[p + "images_seq_mask"][0],
                                pixel_values=arrays[p + "pixel_values"][0])
    np.testing.assert_allclose(logits.numpy()[0], arrays[p + "prefill_logits"][0, -1], rtol=0, atol=1e-4)
    events = batch.start_text("r", slot, len(ids), logits, max_new_tokens=24,
                              eos_id=cases["special_token_ids"]["eos_token_id"])
    tokens = []
    while True:
        tokens += [e.token for e in events if e.kind == "token"]
        if not batch:
            break
        events = batch.step()
    assert tokens == arrays[p + "generated_ids"][0].tolist()


def test_encoder_with_its_own_weights_lets_the_eager_ones_go(golden):
    """release_eager (the CPU runtime's, when prompts are prefilled in the loop): the program is built from copies
    and the eager encoder's weights are freed."""
    arrays, _ = golden
    fresh = load_model(GOLDEN)
    encoder = CpuVisionEncoder(fresh, threads=2, release_eager=True)
    assert not any(p._is_initialized() for p in [*fresh.vision_model.parameters(), *fresh.aligner.parameters()])
    pixels = arrays["preprocess.pixel_values"]
    np.testing.assert_allclose(encoder.encode(pixels), arrays["siglip.aligner_output"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(encoder.encode(pixels[:1]), arrays["siglip.aligner_output"][:1], rtol=0, atol=1e-4)


def test_warm_up_runs_every_copy_and_leaves_the_features_alone(encoder, golden, monkeypatch):
    """The CPU runtime warms the encoder at start (an imported program packs weights on its first run)."""
    arrays, _ = golden
    seen = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda pixels, *, single_thread=False: (
        seen.append((pixels.shape, single_thread)), encode(pixels, single_thread=single_thread))[1])
    encoder.warm_up()
    size = encoder.config.image_size
    assert seen == [((1, 3, size, size), False), ((1, 3, size, size), True)]
    pixels = arrays["preprocess.pixel_values"]
    np.testing.assert_allclose(encode(pixels), arrays["siglip.aligner_output"], rtol=0, atol=1e-4)
