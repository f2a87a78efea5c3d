import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from model import tiny
from model.processor import JanusProcessor

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny.ensure_janus_tiny(tmp_path_factory.mktemp("home"))


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "np") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def key_tree(data):
    """The nested key structure of a JSON object (values ignored)."""
    return {key: key_tree(value) for key, value in data.items()} if isinstance(data, dict) else None


def test_build_is_deterministic_and_fast(tmp_path, folder):
    started = time.perf_counter()
    again = tiny.ensure_janus_tiny(tmp_path / "again")
    assert time.perf_counter() - started < 10
    assert again == tmp_path / "again" / "janus-tiny"
    assert digests(again) == digests(folder)
    # A fresh interpreter has other hash seeds (Python and Rust): the bytes must not depend on them.
    script = "import sys; from model.tiny import ensure_janus_tiny; ensure_janus_tiny(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], cwd=REPO, env=env, check=True)
    assert digests(tmp_path / "other" / "janus-tiny") == digests(folder)


def test_folder_is_complete_with_manifest(folder):
    names = {path.name for path in folder.iterdir()}
    assert names == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", tiny.MANIFEST,
    }
    manifest = json.loads((folder / tiny.MANIFEST).read_text(encoding="utf-8"))
    assert manifest["format_version"] == tiny.FORMAT_VERSION
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    assert not [path for path in folder.parent.iterdir() if path.name != "janus-tiny"]  # no staging left


def test_reused_when_present(folder):
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert tiny.ensure_janus_tiny(folder.parent) == folder
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before


@pytest.mark.parametrize("damage", ["old_version", "truncated_weights", "missing_manifest", "not_a_folder"])
def test_stale_or_damaged_folder_is_rebuilt(tmp_path, folder, damage):
    target = tiny.ensure_janus_tiny(tmp_path)
    if damage == "old_version":
        manifest = json.loads((target / tiny.MANIFEST).read_text(encoding="utf-8"))
        manifest["format_version"] = tiny.FORMAT_VERSION - 1
        (target / tiny.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    elif damage == "truncated_weights":
        with open(target / "model.safetensors", "r+b") as file:
            file.truncate(1000)
    elif damage == "missing_manifest":
        (target / tiny.MANIFEST).unlink()
    else:
        for path in target.iterdir():
            path.unlink()
        target.rmdir()
        target.write_text("not a checkpoint", encoding="utf-8")
    assert not tiny.is_current(target)
    assert tiny.ensure_janus_tiny(tmp_path) == target
    assert digests(target) == digests(folder)
    assert [path.name for path in tmp_path.iterdir()] == ["janus-tiny"]


def test_concurrent_builds_agree(tmp_path, folder):
    results, errors = [], []

    def build():
        try:
            results.append(tiny.ensure_janus_tiny(tmp_path))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert digests(results[0]) == digests(folder)
    assert [path.name for path in tmp_path.iterdir()] == ["janus-tiny"]


def test_processor_loads_and_round_trips_text(folder):
    processor = JanusProcessor.from_folder(folder)
    golden_ids = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))["special_token_ids"]["all"]
    for token, token_id in golden_ids.items():
        assert processor.tokenizer.token_to_id(token) == token_id
    assert processor.tokenizer.get_vocab_size() == 592
    text = "User: A close-up photo of a red apple, naïve café 世界 🙂!\n\nAssistant:"
    ids = processor.encode(text)
    assert ids[0] == processor.bos_id and (ids == processor.bos_id).sum() == 1
    assert processor.tokenizer.encode(text).ids == ids.tolist()
    assert processor.decode(ids) == text
    assert len(processor.encode("the apple on the table", add_bos=False)) < len("the apple on the table") / 2
    generation = processor.encode_generation("a red apple")
    assert generation[0] == processor.bos_id and generation[-1] == processor.image_start_id


def test_tokenizer_is_byte_level_bpe_with_template(folder):
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["type"] == "BPE" and len(data["model"]["vocab"]) == tiny.BPE_VOCAB_SIZE
    assert data["pre_tokenizer"]["type"] == "ByteLevel" and data["decoder"]["type"] == "ByteLevel"
    assert data["post_processor"]["type"] == "TemplateProcessing"
    golden = json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["added_tokens"] == golden["added_tokens"]


def test_weights_have_the_golden_keys_and_shapes(folder):
    shapes = tensor_shapes(folder / "model.safetensors")
    golden = tensor_shapes(GOLDEN / "model.safetensors")
    assert set(shapes) == set(golden)
    assert shapes == golden  # the same tiny sizes as the golden set
    assert {key: shape for key, shape, _ in tiny.checkpoint_layout()} == shapes
    with safe_open(str(folder / "model.safetensors"), "np") as file:
        assert file.metadata() == {"format": "pt"}
        assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F32"}
        lm_head = file.get_tensor("language_model.lm_head.weight")
        embed = file.get_tensor("language_model.model.embed_tokens.weight")
        used = file.get_tensor("gen_vision_model.quantize.codebook_used")
    assert not lm_head[592:].any() and not lm_head[580:592].any() and lm_head[579].any()
    assert abs(float(embed.std()) - 1) < 0.05 and not used.any()


def test_configs_have_the_golden_layout(folder):
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json"):
        ours = json.loads((folder / name).read_text(encoding="utf-8"))
        golden = json.loads((GOLDEN / name).read_text(encoding="utf-8"))
        assert set(key_tree(ours)) <= set(key_tree(golden)), name
    for name in ("processor_config.json", "preprocessor_config.json", "special_tokens_map.json"):
        assert json.loads((folder / name).read_text(encoding="utf-8")) == json.loads(
            (GOLDEN / name).read_text(encoding="utf-8")), name
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "config.json").read_text(encoding="utf-8"))
    for section in ("vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config"):
        assert config[section] == golden[section], section
    assert config["language_config"] == golden["language_config"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["pad_token"] == "<｜▁pad▁｜>"


def test_weights_are_sane(folder):
    with safe_open(str(folder / "model.safetensors"), "np") as file:
        for key in file.keys():
            value = file.get_tensor(key)
            assert np.isfinite(value).all(), key
            assert np.abs(value).max() < 10, key


def test_model_config_expects_a_subset_of_the_stored_keys(folder):
    from model.config import JanusConfig, expected_hf_shapes

    config = JanusConfig.from_file(folder / "config.json")
    assert dataclasses.replace(config, name="janus-tiny") == JanusConfig.from_name("janus-tiny")
    expected = expected_hf_shapes(config.with_checkpoint_shapes(tensor_shapes(folder / "model.safetensors")))
    stored = tensor_shapes(folder / "model.safetensors")
    assert {key: stored[key] for key in expected} == expected
    unused = sorted(set(stored) - set(expected))
    assert all(key.startswith(("gen_vision_model.encoder.", "gen_vision_model.quant_conv.",
                               "gen_vision_model.quantize.codebook_used", "vision_model.vision_tower.attn_pool."))
               for key in unused)


def test_loader_runs_janus_tiny(folder):
    from model.loader import load_model

    model = load_model(folder)
    processor = JanusProcessor.from_folder(folder)
    hidden = model.config.hidden_size
    image = Image.open(GOLDEN / "images" / "img0_rgb_300x200.png")
    inputs = processor.encode_understanding([{"role": "user", "content": "Describe the colors.", "images": 1}], [image])
    embeds = model.embed_tokens(inputs.input_ids[None]).numpy()
    embeds[0, inputs.image_mask] = model.encode_images(inputs.pixel_values).numpy().reshape(-1, hidden)
    length = len(inputs.input_ids)
    cache = model.new_cache(1, length + 8)
    slots = np.array([0], np.int64)
    last = model.forward_hidden(embeds, cache, slots, np.array([0], np.int64)).numpy()[:, -1]
    tokens = []
    for step in range(8):
        logits = model.text_logits(last).numpy()[0]
        assert np.isfinite(logits).all() and not logits[592:].any()
        tokens.append(int(logits.argmax()))
        token_embeds = model.embed_tokens(np.array([[tokens[-1]]], np.int64))
        last = model.forward_hidden(token_embeds, cache, slots, np.array([length + step], np.int64)).numpy()[:, -1]
    # Greedy tokens of an independent numpy forward pass (top-2 logit margins >= 0.048).
    assert tokens == [366, 156, 150, 216, 339, 493, 242, 332]
    assert processor.decode(tokens)

    prompt = processor.encode_generation("A red apple on a table")
    unconditional = prompt.copy()
    unconditional[1:-1] = processor.pad_id
    rows = np.stack([prompt, unconditional])
    cache = model.new_cache(2, len(prompt) + 16)
    slots = np.array([0, 1], np.int64)
    last = model.forward_hidden(model.embed_tokens(rows), cache, slots, np.zeros(2, np.int64)).numpy()[:, -1]
    codes = []
    for step in range(11):
        logits = model.image_logits(last).numpy()
        codes.append(int((logits[1] + 5 * (logits[0] - logits[1])).argmax()))
        image_embeds = model.embed_image_tokens(np.array([[codes[-1]]] * 2, np.int64))
        start = np.full(2, len(prompt) + step, np.int64)
        last = model.forward_hidden(image_embeds, cache, slots, start).numpy()[:, -1]
    # CFG-greedy codes of the same numpy reference (margins >= 0.042).
    assert codes == [4, 13, 23, 4, 13, 23, 51, 13, 23, 9, 52]

    decoded = model.decode_image_tokens(np.arange(576, dtype=np.int64)[None] % 64).numpy()
    assert decoded.shape == (1, 3, 384, 384) and np.isfinite(decoded).all() and decoded.std() > 0.05
