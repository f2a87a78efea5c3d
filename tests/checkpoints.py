"""Writes test checkpoints derived from the golden one: other layouts, shards, dtypes, and damaged copies."""
from __future__ import annotations

import collections
import contextlib
import io
import json
import pickle
import shutil
import sys
import types
import zipfile
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


def fuse_paddlenlp_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int) -> np.ndarray:
    """[in, out] q/k/v weights as one PaddleNLP qkv_proj weight (fuse_attention_qkv): per key/value
    head, its group of query heads, then its key, then its value."""
    rows = q.shape[0]
    grouped = [w.reshape(rows, kv_heads, -1) for w in (q, k, v)]
    return np.concatenate(grouped, axis=2).reshape(rows, -1)


def paddlenlp_arrays(fused: bool = False) -> dict[str, np.ndarray]:
    """The golden weights under PaddleNLP's names (language_model.llama.*) with Linear weights as [in, out].
    With `fused`, as a config with fuse_attention_qkv and fuse_attention_ffn saves them: qkv_proj and
    gate_up_fused_proj instead of q/k/v and gate/up."""
    arrays = {}
    for name, array in golden_tensors().items():
        if array.ndim == 2 and name.endswith(".weight") and not name.endswith(EMBEDDINGS):
            array = np.ascontiguousarray(array.T)
        arrays[name.replace("language_model.model.", "language_model.llama.")] = array
    if fused:
        kv_heads = json.loads((GOLDEN / "config.json").read_text())["language_config"]["num_key_value_heads"]
        for name in [n for n in arrays if n.endswith("self_attn.q_proj.weight")]:
            base = name[: -len("q_proj.weight")]
            q, k, v = (arrays.pop(f"{base}{p}_proj.weight") for p in "qkv")
            arrays[f"{base}qkv_proj.weight"] = fuse_paddlenlp_qkv(q, k, v, kv_heads)
        for name in [n for n in arrays if n.endswith("mlp.gate_proj.weight")]:
            base = name[: -len("gate_proj.weight")]
            gate, up = arrays.pop(f"{base}gate_proj.weight"), arrays.pop(f"{base}up_proj.weight")
            arrays[f"{base}gate_up_fused_proj.weight"] = np.concatenate([gate, up], axis=1)
    return arrays


def write_paddlenlp(dst: Path, shards: int = 1, fused: bool = False) -> Path:
    """The golden weights as the PaddleNLP release stores them: model_state.pdparams with
    paddlenlp_arrays(fused), plus image_preprocessor_config.json. With `shards` > 1, as PaddleNLP's
    save_pretrained splits a large model: model_state-0000i-of-0000N.pdparams files and a
    model_state.pdparams.index.json."""
    import paddle

    copy_side_files(dst)
    shutil.copy(GOLDEN / "preprocessor_config.json", dst / "image_preprocessor_config.json")
    arrays = paddlenlp_arrays(fused)
    state = {name: paddle.to_tensor(array) for name, array in arrays.items()}
    if shards == 1:
        paddle.save(state, str(dst / "model_state.pdparams"))
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file_name = f"model_state-{i + 1:05d}-of-{shards:05d}.pdparams"
        part = {name: state[name] for name in names[i::shards]}
        paddle.save(part, str(dst / file_name))
        weight_map.update({name: file_name for name in part})
    (dst / "model_state.pdparams.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
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


@contextlib.contextmanager
def _fake_torch_globals():
    """Stand-ins named like torch's pickled globals, so that pickle can write references to them."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled by name")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "BFloat16Storage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module


class _TensorRecord:
    def __init__(self, rebuild, storage_id, shape):
        self.rebuild, self.storage_id, self.shape = rebuild, storage_id, shape

    def __reduce__(self):
        stride, step = [], 1
        for size in reversed(self.shape):
            stride.insert(0, step)
            step *= size
        return self.rebuild, (self.storage_id, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())


class _StatePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj if isinstance(obj, tuple) and obj and obj[0] == "storage" else None


def write_torch_bin(dst: Path, bfloat16: bool = False) -> Path:
    """The golden weights as torch.save writes pytorch_model.bin (zip: data.pkl + one storage per tensor),
    made without torch."""
    copy_side_files(dst)
    tensors = golden_tensors()
    with _fake_torch_globals() as (torch, utils):
        storage_type = torch.BFloat16Storage if bfloat16 else torch.FloatStorage
        state, blobs = collections.OrderedDict(), {}
        for key, (name, array) in enumerate(sorted(tensors.items())):
            data = to_bfloat16_bits(array) if bfloat16 else array.astype(np.float32)
            blobs[str(key)] = data.tobytes()
            storage_id = ("storage", storage_type, str(key), "cpu", int(array.size))
            state[name] = _TensorRecord(utils._rebuild_tensor_v2, storage_id, array.shape)
        buffer = io.BytesIO()
        _StatePickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(dst / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("pytorch_model/data.pkl", buffer.getvalue())
        archive.writestr("pytorch_model/byteorder", "little")
        for key, blob in blobs.items():
            archive.writestr(f"pytorch_model/data/{key}", blob)
        archive.writestr("pytorch_model/version", "3\n")
    return dst
