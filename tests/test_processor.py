import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.processor import (
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    IMAGE_TOKEN,
    JANUS_PRO_ROLES,
    JanusProcessor,
    ProcessorError,
    to_rgb,
)

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
CASES = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))
ARRAYS = np.load(GOLDEN / "cases.npz")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "processor_config.json", "preprocessor_config.json", "config.json",
)


@pytest.fixture(scope="module")
def processor():
    return JanusProcessor.from_folder(GOLDEN)


def golden_messages(case):
    """The golden conversation in the processor's OpenAI-style messages, with its images."""
    user = case["conversation"][0]
    images = [Image.open(GOLDEN / name) for name in user.get("images", [])]
    return [{"role": "user", "content": user["content"], "images": len(images)}], images


def copy_tokenizer_folder(tmp_path, edit_tokenizer=None, edit_config=None):
    for name in TOKENIZER_FILES:
        shutil.copy(GOLDEN / name, tmp_path / name)
    if edit_tokenizer:
        data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
        edit_tokenizer(data)
        (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    if edit_config:
        data = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
        edit_config(data)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_special_token_ids_match_golden(processor):
    ids = CASES["special_token_ids"]
    assert (processor.bos_id, processor.eos_id, processor.pad_id) == (578, 579, 580) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["tokenizer.pad_token_id"])
    assert (processor.image_id, processor.image_start_id, processor.image_end_id) == (581, 582, 583)
    assert processor.num_image_tokens == 576
    assert processor.roles == ("User", "Assistant")


@pytest.mark.parametrize("index", range(5))
def test_preprocess_is_bit_exact(processor, index):
    image = Image.open(GOLDEN / CASES["images"][index]["file"])
    assert image.mode == CASES["images"][index]["mode"]
    resized = processor.resize_and_pad(image)
    assert resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, ARRAYS["preprocess.resized_uint8"][index])
    pixels = processor.preprocess_image(image)
    assert pixels.dtype == np.float32 and pixels.shape == (3, 384, 384)
    np.testing.assert_array_equal(pixels, ARRAYS["preprocess.pixel_values"][index])


@pytest.mark.parametrize("name", ["conv1", "conv2"])
def test_understanding_inputs_match_golden(processor, name):
    case = CASES["cases"]["understanding"][name]
    messages, images = golden_messages(case)
    inputs = processor.encode_understanding(messages, images)
    assert inputs.prompt == case["sft_format"]
    assert processor.render_chat(messages) == case["sft_format"]
    assert processor.encode(case["sft_format"]).tolist() == case["text_token_ids_before_image_expansion"]
    assert inputs.input_ids.dtype == np.int64 and inputs.image_mask.dtype == bool
    np.testing.assert_array_equal(inputs.input_ids, ARRAYS[f"understanding.{name}.input_ids"][0])
    np.testing.assert_array_equal(inputs.image_mask, ARRAYS[f"understanding.{name}.images_seq_mask"][0])
    emb_mask = ARRAYS[f"understanding.{name}.images_emb_mask"][0]
    assert emb_mask.all() and emb_mask.shape == (len(images), processor.num_image_tokens)
    np.testing.assert_array_equal(inputs.pixel_values, ARRAYS[f"understanding.{name}.pixel_values"][0])


def test_placeholders_are_inserted_when_the_text_has_none(processor):
    case = CASES["cases"]["understanding"]["conv1"]
    text = case["conversation"][0]["content"].replace(IMAGE_TOKEN + "\n", "")
    image = Image.open(GOLDEN / case["conversation"][0]["images"][0])
    inputs = processor.encode_understanding([{"role": "user", "content": text, "images": 1}], [image])
    assert inputs.prompt == case["sft_format"]
    np.testing.assert_array_equal(inputs.input_ids, ARRAYS["understanding.conv1.input_ids"][0])


def test_batch_rows_without_left_padding_match(processor):
    for row, name in enumerate(["conv1", "conv2"]):
        messages, images = golden_messages(CASES["cases"]["understanding"][name])
        inputs = processor.encode_understanding(messages, images)
        keep = ARRAYS["understanding_batch.attention_mask"][row].astype(bool)
        assert (ARRAYS["understanding_batch.input_ids"][row][~keep] == processor.pad_id).all()
        np.testing.assert_array_equal(inputs.input_ids, ARRAYS["understanding_batch.input_ids"][row][keep])
        np.testing.assert_array_equal(inputs.image_mask, ARRAYS["understanding_batch.images_seq_mask"][row][keep])
        assert ARRAYS["understanding_batch.images_emb_mask"][row].sum() == inputs.image_mask.sum()


def test_generation_prompt_matches_golden(processor):
    case = CASES["cases"]["generation"]
    ids = processor.encode_generation(case["conversation"][0]["content"])
    assert ids.dtype == np.int64
    assert ids.tolist() == case["prompt_token_ids"]
    rows = ARRAYS["generation.input_ids"]
    for cond, uncond in zip(rows[0::2], rows[1::2]):
        np.testing.assert_array_equal(cond, ids)
        # The unconditional rows keep BOS and <begin_of_image> and pad the rest with the pad id.
        np.testing.assert_array_equal(uncond[1:-1], processor.pad_id)
    assert processor.decode(ids, skip_special_tokens=False) == processor.bos_token + case["prompt"]


def test_generation_prompt_rejects_image_placeholder(processor):
    with pytest.raises(ValueError, match="image_placeholder"):
        processor.encode_generation(f"draw {IMAGE_TOKEN}")


def test_decode_matches_golden_texts(processor):
    understanding = CASES["cases"]["understanding"]
    for name in ["conv1", "conv2"]:
        text = processor.decode(ARRAYS[f"understanding.{name}.generated_ids"][0])
        assert text == understanding[name]["decoded_text_skip_special_tokens"]
    batch = CASES["cases"]["understanding_batch"]
    for row, expected in zip(ARRAYS["understanding_batch.generated_ids"], batch["decoded_text_skip_special_tokens"]):
        assert processor.decode(row.tolist()) == expected


def test_decode_skips_special_tokens_only_when_asked(processor):
    ids = [processor.bos_id, *processor.encode("hi", add_bos=False), processor.eos_id]
    assert processor.decode(ids) == "hi"
    assert processor.decode(ids, skip_special_tokens=False) == f"{processor.bos_token}hi{EOS_TOKEN}"


def test_pro_roles():
    processor = JanusProcessor.from_folder(GOLDEN, roles=JANUS_PRO_ROLES)
    text = processor.render_chat([{"role": "user", "content": "hi"}], system_prompt="")
    assert text == "<|User|>: hi\n\n<|Assistant|>:"
    ids = processor.encode(text).tolist()
    assert ids.count(processor.tokenizer.token_to_id("<|User|>")) == 1
    assert ids[-2:] == [processor.tokenizer.token_to_id("<|Assistant|>"), processor.encode(":", add_bos=False)[0]]


def test_roles_hint_from_config_json(tmp_path):
    folder = copy_tokenizer_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["chat_roles"] = list(JANUS_PRO_ROLES)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert JanusProcessor.from_folder(folder).roles == JANUS_PRO_ROLES
    assert JanusProcessor.from_folder(folder, roles=("User", "Assistant")).roles == ("User", "Assistant")


def test_multi_turn_with_assistant_turn(processor):
    messages = [
        {"role": "user", "content": "What is this?", "images": 1},
        {"role": "assistant", "content": " A square. "},
        {"role": "user", "content": "And its colour?"},
    ]
    text = processor.render_chat(messages)
    assert text == (
        f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: {IMAGE_TOKEN}\nWhat is this?\n\n"
        f"Assistant: A square.{EOS_TOKEN}User: And its colour?\n\nAssistant:"
    )
    image = Image.new("RGB", (32, 16), (200, 10, 10))
    inputs = processor.encode_understanding(messages, [image])
    assert (inputs.input_ids == processor.eos_id).sum() == 1
    assert (inputs.input_ids == processor.bos_id).sum() == 1 and inputs.input_ids[0] == processor.bos_id
    assert inputs.image_mask.sum() == 576 and inputs.pixel_values.shape == (1, 3, 384, 384)
    # An explicit empty assistant turn at the end is the generation prompt itself, not a second one.
    assert processor.render_chat(messages + [{"role": "assistant", "content": ""}]) == text
    assert processor.render_chat(messages + [{"role": "assistant", "content": " \n"}]) == text


def test_system_prompt_override(processor):
    question = [{"role": "user", "content": "Hello"}]
    assert processor.render_chat(question, system_prompt="") == "User: Hello\n\nAssistant:"
    assert processor.render_chat(question, system_prompt=None) == processor.render_chat(question)
    assert processor.render_chat(question, system_prompt="Be brief.") == "Be brief.\n\nUser: Hello\n\nAssistant:"
    with_system = [{"role": "system", "content": "Be kind."}, *question]
    assert processor.render_chat(with_system) == "Be kind.\n\nUser: Hello\n\nAssistant:"
    text_only = processor.encode_understanding(question, [], system_prompt="")
    assert text_only.pixel_values.shape == (0, 3, 384, 384) and not text_only.image_mask.any()
    assert text_only.input_ids.tolist() == processor.encode("User: Hello\n\nAssistant:").tolist()


def test_image_count_mismatch_is_a_clear_error(processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="2 image"):
        processor.render_chat([{"role": "user", "content": f"{IMAGE_TOKEN} only one", "images": 2}])
    with pytest.raises(ValueError, match="contains 1"):
        processor.render_chat([{"role": "user", "content": f"{IMAGE_TOKEN} but no image"}])
    with pytest.raises(ValueError, match="1 image placeholder.*2 image"):
        processor.encode_understanding([{"role": "user", "content": "x", "images": 1}], [image, image])
    with pytest.raises(ValueError, match="role"):
        processor.render_chat([{"role": "tool", "content": "x"}])


def make_image(mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
        assert image.mode == "I;16"
        return image
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "La":
        return rgba.convert("LA").convert("La")
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1", "La", "RGBa", "F", "I", "YCbCr"])
def test_all_image_modes_preprocess(processor, mode):
    image = make_image(mode)
    assert image.mode == mode
    pixels = processor.preprocess_image(image)
    assert pixels.shape == (3, 384, 384) and pixels.dtype == np.float32
    assert np.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1
    if mode != "La":
        # Whatever PIL's convert("RGB") gives (for 16-bit: clipped to 255), as the reference.
        np.testing.assert_array_equal(pixels, processor.preprocess_image(image.convert("RGB")))


def test_rgba_drops_alpha_and_grey_is_replicated():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_extreme_aspect_ratio_keeps_min_size(processor):
    resized = processor.resize_and_pad(Image.new("RGB", (2000, 3), (255, 0, 0)))
    red_rows = np.flatnonzero((resized[0] == 255).all(axis=1))
    assert resized.shape == (3, 384, 384) and red_rows.tolist() == list(range(185, 185 + 14))
    assert (resized[:, 0] == 127).all()


def test_tokenizer_without_image_placeholder_gets_it(tmp_path):
    def drop_placeholder(data):
        # As a release without the token would look: the later added tokens numbered one lower.
        kept = []
        for token in data["added_tokens"]:
            if token["content"] == IMAGE_TOKEN:
                continue
            if token["id"] > 581:
                token["id"] -= 1
            kept.append(token)
        data["added_tokens"] = kept

    folder = copy_tokenizer_folder(tmp_path, edit_tokenizer=drop_placeholder)
    processor = JanusProcessor.from_folder(folder)
    assert processor.image_id == 591
    assert processor.encode(IMAGE_TOKEN, add_bos=False).tolist() == [591]
    image = Image.new("RGB", (8, 8))
    inputs = processor.encode_understanding([{"role": "user", "content": "x", "images": 1}], [image])
    assert inputs.image_mask.sum() == 576 and (inputs.input_ids == 591).sum() == 576


def test_tokenizer_without_bos_post_processor_gets_exactly_one_bos(tmp_path):
    def drop_post_processor(data):
        data["post_processor"] = None

    folder = copy_tokenizer_folder(tmp_path, edit_tokenizer=drop_post_processor)
    processor = JanusProcessor.from_folder(folder)
    ids = processor.encode("User: hi").tolist()
    assert ids[0] == processor.bos_id and ids.count(processor.bos_id) == 1
    assert processor.tokenizer.encode("User: hi").ids == ids
    golden_ids = JanusProcessor.from_folder(GOLDEN).encode("User: hi").tolist()
    assert ids == golden_ids and golden_ids.count(578) == 1


def test_add_bos_token_false_means_no_bos(tmp_path):
    folder = copy_tokenizer_folder(tmp_path, edit_config=lambda config: config.update(add_bos_token=False))
    processor = JanusProcessor.from_folder(folder)
    assert processor.bos_id not in processor.encode("User: hi").tolist()
    assert processor.bos_id not in processor.tokenizer.encode("User: hi").ids


def test_tokenizer_without_pad_token_fails_clearly(tmp_path):
    def drop_pad(data):
        data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<｜▁pad▁｜>"]

    def pad_is_eos(config):
        config["pad_token"] = config["eos_token"]

    folder = copy_tokenizer_folder(tmp_path, edit_tokenizer=drop_pad, edit_config=pad_is_eos)
    (folder / "special_tokens_map.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ProcessorError, match="pad token"):
        JanusProcessor.from_folder(folder)


def test_missing_tokenizer_file_fails_clearly(tmp_path):
    with pytest.raises(ProcessorError, match="tokenizer.json"):
        JanusProcessor.from_folder(tmp_path)


def test_incremental_decoder_never_emits_partial_characters(processor):
    text = "Café — naïve 世界 🙂 done"
    ids = processor.encode(text, add_bos=False).tolist()
    assert len(ids) > len(text) // 2  # the tiny vocabulary splits the multi-byte characters into bytes
    decoder = processor.incremental_decoder()
    pieces = [decoder.push(token_id) for token_id in [processor.bos_id, *ids, processor.eos_id]]
    pieces.append(decoder.finish())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == decoder.text == text
    assert "" in pieces  # some tokens held back an incomplete character
    assert "🙂" in pieces[[i for i, piece in enumerate(pieces) if "🙂" in piece][0]]


def test_incremental_decoder_matches_full_decode_with_invalid_bytes(processor):
    emoji = processor.encode("🙂", add_bos=False).tolist()
    assert len(emoji) > 1
    ids = [*processor.encode("a", add_bos=False), emoji[0], *processor.encode(" b", add_bos=False), emoji[0]]
    decoder = processor.incremental_decoder()
    streamed = decoder.extend(ids)
    assert not streamed.endswith("\ufffd")
    streamed += decoder.finish()
    assert streamed == processor.decode(ids) and streamed.count("\ufffd") == 2
    for golden_ids in ARRAYS["understanding_batch.generated_ids"]:
        decoder = processor.incremental_decoder()
        assert decoder.extend(golden_ids) + decoder.finish() == processor.decode(golden_ids)
