"""Writes test checkpoints derived from the golden one: other layouts, shards, dtypes, and damaged copies."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Two-dimensional weights that are embeddings, not Linear layers (same layout in PyTorch and Paddle).
EMBEDDINGS = ("embed_tokens.weight", "gen_embed.weight", "quantize.embedding.weight")


def golden_tensors() -> dict[str, np.ndarray]:
    return load_file(str(GOLDEN / "model.safetensors"))


def copy_side_files(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copy(GOLDEN / name, dst / name)
    return dst


def write_safetensors(dst: Path, tensors: dict[str, np.ndarray], config: dict | None = None) -> Path:
    """An HF-layout folder: the golden side files (or `config`) and one model.safetensors."""
    copy_side_files(dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def write_sharded(dst: Path, shards: int = 3) -> Path:
    """The golden weights split over `shards` files with a model.safetensors.index.json."""
    copy_side_files(dst)
    tensors = golden_tensors()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        save_file(part, str(dst / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def write_paddlenlp(dst: Path) -> Path:
    """The golden weights as the PaddleNLP release stores them: model_state.pdparams with
    language_model.llama.* keys and Linear weights as [in, out], plus image_preprocessor_config.json."""
    import paddle

    copy_side_files(dst)
    shutil.copy(GOLDEN / "preprocessor_config.json", dst / "image_preprocessor_config.json")
    state = {}
    for name, array in golden_tensors().items():
        if array.ndim == 2 and name.endswith(".weight") and not name.endswith(EMBEDDINGS):
            array = np.ascontiguousarray(array.T)
        state[name.replace("language_model.model.", "language_model.llama.")] = paddle.to_tensor(array)
    paddle.save(state, str(dst / "model_state.pdparams"))
    return dst


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (rounded >> 16).astype(np.uint16)


def write_bfloat16(dst: Path) -> Path:
    """The golden weights stored as BF16 (the dtype of the real release)."""
    copy_side_files(dst)
    tensors = golden_tensors()
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        blob = to_bfloat16_bits(tensors[name]).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)
    return dst


def truncate(path: Path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
