"""Work in pieces (model/pieces.py): the image encoder, the VQ decoder and prefills, cut up, give what they give
in one call."""
import numpy as np
import pytest

from model.generation import DecodeBatch, image_seeds
from model.pieces import advance, drain
from model.static_step import StaticStep


def pieces_of(work):
    """(how many pieces `work` ran in, its result)."""
    count = 0
    while True:
        count += 1
        done, result = advance(work)
        if done:
            return count, result


def test_drain_and_advance_run_a_generator_to_its_result():
    def work():
        yield
        yield
        return 7

    assert drain(work()) == 7
    assert pieces_of(work()) == (3, 7)


def test_image_encoder_and_vq_decoder_in_pieces_run_the_same_operations(model):
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (2, 3, 384, 384)).astype(np.float32)
    count, features = pieces_of(model.encode_image_pieces(pixels, 1))
    assert count == len(model.vision_model.blocks)
    np.testing.assert_array_equal(features.numpy(), model.encode_images(pixels).numpy())

    codes = rng.integers(0, model.config.gen_vision.codebook_size, (2, 576))
    count, decoded = pieces_of(model.decode_image_pieces(codes))
    residual_and_upsampling = sum(len(level.res) + (level.upsample is not None)
                                  for level in model.gen_vision_model.decoder.conv_blocks)
    assert count == 1 + residual_and_upsampling
    np.testing.assert_array_equal(decoded.numpy(), model.decode_image_tokens(codes).numpy())


def batches(model):
    """A batch over the reference forward, and one over the static step."""
    step = StaticStep(model.language_model.model, model.dtype_name)
    return {"reference": lambda: DecodeBatch(model, slots=4, max_len=800),
            "static": lambda: DecodeBatch(model, slots=4, max_len=800, forward_hidden=step.forward_hidden,
                                          new_cache=step.new_cache)}


@pytest.mark.parametrize("kind", ["reference", "static"])
@pytest.mark.parametrize("chunk", [1000, 256, 97])
def test_a_prompt_prefilled_in_chunks_gives_what_one_pass_gives(model, golden, kind, chunk):
    """Understanding: the image encoder a block at a time, then the prompt `chunk` tokens at a time; image
    prompts: their CFG rows `chunk` tokens at a time over all rows. Then steps from there."""
    arrays, cases = golden
    eos = cases["special_token_ids"]["eos_token_id"]
    pad = cases["special_token_ids"]["pad_id (processor.pad_id, '<｜▁pad▁｜>')"]
    ids = arrays["understanding.conv1.input_ids"][0]
    text = {"image_mask": arrays["understanding.conv1.images_seq_mask"][0],
            "pixel_values": arrays["understanding.conv1.pixel_values"][0]}
    prompt = arrays["generation.input_ids"][0].astype(np.int64)
    results = []
    for pieces in (False, True):
        batch = batches(model)[kind]()
        slot = batch.reserve_text(len(ids), 8)
        options = {"chunk": chunk, "vision_blocks": 1} if pieces else {}
        count, logits = pieces_of(batch.prefill_text_pieces(slot, ids, **text, **options))
        vision = len(model.vision_model.blocks) if pieces else 1  # and the merge ends a piece of its own
        assert count == (vision + -(-len(ids) // chunk) if pieces else 1)
        events = batch.start_text("t", slot, len(ids), logits, max_new_tokens=8, eos_id=eos)
        slots = batch.reserve_images(len(prompt), 1)
        count, image_logits = pieces_of(batch.prefill_image_pieces(slots, prompt, pad_id=pad,
                                                                   chunk=chunk if pieces else None))
        assert count == (-(-len(prompt) // max(1, chunk // 2)) if pieces else 1)
        events += batch.start_images("i", slots, len(prompt), image_logits, seeds=image_seeds(3, 1))
        for _ in range(6):
            events += batch.step()
        results.append((logits.numpy(), image_logits.numpy(), [(e.key, e.kind, e.token, e.step) for e in events]))
    (text_whole, image_whole, events_whole), (text_cut, image_cut, events_cut) = results
    np.testing.assert_allclose(text_cut, text_whole, rtol=0, atol=1e-4 * np.abs(text_whole).max())
    np.testing.assert_allclose(image_cut, image_whole, rtol=0, atol=1e-4 * np.abs(image_whole).max())
    assert events_cut == events_whole
