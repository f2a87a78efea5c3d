"""The two generation algorithms against the official implementation's outputs (golden set)."""
import numpy as np
import pytest

from model.generation import (
    DecodeBatch, SamplingParams, cfg_prompt_rows, generate_images, generate_text, image_seeds,
)


def understanding_inputs(arrays, case):
    return {
        "input_ids": arrays[f"understanding.{case}.input_ids"][0],
        "image_mask": arrays[f"understanding.{case}.images_seq_mask"][0],
        "pixel_values": arrays[f"understanding.{case}.pixel_values"][0],
    }


@pytest.mark.parametrize("case", ["conv1", "conv2"])
def test_greedy_understanding_matches_reference(model, golden, case):
    arrays, cases = golden
    eos = cases["special_token_ids"]["eos_token_id"]
    (ids,) = generate_text(model, [understanding_inputs(arrays, case)], eos_id=eos, max_new_tokens=24)
    assert ids == arrays[f"understanding.{case}.generated_ids"][0].tolist()


def test_batched_understanding_matches_reference(model, golden):
    """The left-padded reference batch, run as two rows of different lengths in one batch."""
    arrays, cases = golden
    eos = cases["special_token_ids"]["eos_token_id"]
    inputs = []
    for row in range(2):
        keep = arrays["understanding_batch.attention_mask"][row].astype(bool)
        ids = arrays["understanding_batch.input_ids"][row][keep]
        mask = arrays["understanding_batch.images_seq_mask"][row][keep]
        n_images = int(arrays["understanding_batch.images_emb_mask"][row].any(axis=1).sum())
        case = "conv1" if n_images == 1 else "conv2"
        pixels = arrays[f"understanding.{case}.pixel_values"][0]
        inputs.append({"input_ids": ids, "image_mask": mask, "pixel_values": pixels})
    assert len(inputs[0]["input_ids"]) != len(inputs[1]["input_ids"])
    out = generate_text(model, inputs, eos_id=eos, max_new_tokens=24)
    assert out == arrays["understanding_batch.generated_ids"].tolist()


def test_greedy_text_to_image_matches_reference(model, golden):
    arrays, cases = golden
    pad = cases["special_token_ids"]["pad_id (processor.pad_id, '<｜▁pad▁｜>')"]
    input_ids = arrays["generation.input_ids"].astype(np.int64)
    np.testing.assert_array_equal(cfg_prompt_rows(input_ids[0], pad, 2), input_ids)
    codes, images = generate_images(model, input_ids[0], pad_id=pad, n=2, cfg_weight=5.0,
                                    params=SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(codes, arrays["generation.image_tokens"])
    expected = arrays["generation.images_uint8"]
    diff = np.abs(images.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.001


def test_sampling_is_reproducible_per_seed_alone_or_batched(model, golden):
    """A seeded image request gives the same tokens alone and next to other requests."""
    arrays, cases = golden
    pad = cases["special_token_ids"]["pad_id (processor.pad_id, '<｜▁pad▁｜>')"]
    eos = cases["special_token_ids"]["eos_token_id"]
    prompt = arrays["generation.input_ids"][0].astype(np.int64)
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.9)

    alone = DecodeBatch(model, slots=2, max_len=700)
    events = alone.add_images("a", prompt, pad_id=pad, n=1, params=params, seeds=image_seeds(1234, 1))
    while alone:
        events += alone.step()
    codes_alone = [e.codes for e in events if e.kind == "codes_done"][0]

    mixed = DecodeBatch(model, slots=8, max_len=1400)
    events = mixed.add_images("other", prompt[:-3].copy(), pad_id=pad, n=2, params=params,
                              seeds=image_seeds(99, 2))
    for _ in range(5):
        events += mixed.step()
    events += mixed.add_text("text", understanding_inputs(arrays, "conv1")["input_ids"],
                             image_mask=understanding_inputs(arrays, "conv1")["image_mask"],
                             pixel_values=understanding_inputs(arrays, "conv1")["pixel_values"],
                             params=SamplingParams(0.7, 0, 0.95), seed=5,
                             max_new_tokens=30, eos_id=eos)
    events += mixed.add_images("a", prompt, pad_id=pad, n=1, params=params, seeds=image_seeds(1234, 1))
    while mixed:
        events += mixed.step()
    codes_mixed = [e.codes for e in events if e.kind == "codes_done" and e.key == "a"][0]
    np.testing.assert_array_equal(codes_alone, codes_mixed)
    assert mixed.pool.free == 8


def test_penalties_steer_greedy_understanding_step_by_step(model, golden):
    """Greedy decoding with both penalties, against a reference that re-runs the whole prompt plus the
    answer so far at each step (no cache) and applies OpenAI's formula to its last logits itself."""
    arrays, cases = golden
    eos = cases["special_token_ids"]["eos_token_id"]
    inputs = understanding_inputs(arrays, "conv1")
    params = SamplingParams(presence_penalty=0.4, frequency_penalty=0.8)
    (penalized,) = generate_text(model, [inputs], eos_id=eos, params=params, max_new_tokens=12)
    (plain,) = generate_text(model, [inputs], eos_id=eos, max_new_tokens=12)
    assert penalized != plain

    expected = []
    while len(expected) < 12 and eos not in expected:
        ids = np.concatenate([inputs["input_ids"], np.asarray(expected, np.int64)]).astype(np.int64)
        mask = np.concatenate([inputs["image_mask"], np.zeros(len(expected), bool)])
        fresh = DecodeBatch(model, slots=1, max_len=len(ids))
        logits = fresh.prefill_text(0, ids, image_mask=mask, pixel_values=inputs["pixel_values"]).numpy()[0]
        logits = logits.astype(np.float64)
        tokens, counts = np.unique(np.asarray(expected, np.int64), return_counts=True)
        logits[tokens] -= counts * params.frequency_penalty + params.presence_penalty
        expected.append(int(np.argmax(logits)))
    assert penalized == expected


def test_cache_rows_are_freed_and_too_long_requests_refused(model, golden):
    arrays, cases = golden
    pad = cases["special_token_ids"]["pad_id (processor.pad_id, '<｜▁pad▁｜>')"]
    prompt = arrays["generation.input_ids"][0].astype(np.int64)
    batch = DecodeBatch(model, slots=2, max_len=100)
    with pytest.raises(ValueError, match="cache positions"):
        batch.add_images("x", prompt, pad_id=pad, n=1)
    assert batch.pool.free == 2


def test_preview_palette_recovers_a_per_token_linear_decoder():
    """Where the decoder paints each token's 16x16 patch in a linear function of its codebook row, the
    fitted palette is that function; tokens not sampled yet are grey."""
    from model.preview import PreviewPalette

    rng = np.random.default_rng(3)
    codebook = rng.standard_normal((500, 8))
    rows = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
    mix, offset = rng.uniform(-60, 60, (8, 3)), np.array([120.0, 130.0, 110.0])

    def decode(codes):
        colors = rows[codes[0]] @ mix + offset  # [576, 3]
        return np.repeat(np.repeat(colors.reshape(1, 24, 24, 3), 16, axis=1), 16, axis=2)

    palette = PreviewPalette.fit(codebook, decode)
    expected = np.clip(np.rint(rows @ mix + offset), 0, 255)
    assert np.abs(palette.colors.astype(float) - expected).max() <= 1
    codes = rng.integers(0, 500, (2, 100))
    previews = palette.previews(codes)
    assert previews.shape == (2, 24, 24, 3) and previews.dtype == np.uint8
    flat = previews.reshape(2, 576, 3)
    assert np.array_equal(flat[:, :100], palette.colors[codes]) and (flat[:, 100:] == 128).all()



def test_decode_steps_leave_no_python_objects_behind(model, golden):
    """A worker steps millions of times: a step must not keep anything alive. (paddle.to_tensor kept a
    list per call in Paddle 3.3.1: a worker's memory grew without end; model/tensors.py.)"""
    import gc

    arrays, _ = golden
    batch = DecodeBatch(model, slots=3, max_len=1024)
    batch.add_text("text", **understanding_inputs(arrays, "conv1"), max_new_tokens=300, eos_id=-1)
    batch.add_images("image", arrays["generation.input_ids"][0].astype(np.int64), pad_id=0, n=1, seeds=image_seeds(1, 1))
    for _ in range(5):
        batch.step()
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(100):
        batch.step()
    gc.collect()
    # the sequences' own lists grow by a token per step and hold ints, which gc does not track
    assert len(gc.get_objects()) - before < 20
