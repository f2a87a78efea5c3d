"""The one checkpoint loader: HF (safetensors, PyTorch layouts) and PaddleNLP (pdparams, Paddle layouts).

Checkpoint keys are first renamed to the HF names (`_CANONICAL_PREFIXES`), checked
strictly against `expected_hf_shapes`, then copied tensor by tensor into a lazily
built model through `_MODEL_RENAMES` / `_FUSED` (q/k/v and gate/up are concatenated).
"""
from __future__ import annotations

import collections
import json
import logging
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn

from .config import ConfigError, JanusConfig, expected_hf_shapes
from .janus import JanusModel

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A model folder that cannot be loaded: missing or damaged files, wrong keys or shapes."""


# PaddleNLP names -> HF names.
_CANONICAL_PREFIXES = [("language_model.llama.", "language_model.model.")]
# HF names -> this model's parameter names.
_MODEL_RENAMES = [
    ("vision_model.vision_tower.", "vision_model."),
    ("gen_vision_model.quantize.embedding.", "gen_vision_model.codebook."),
]
# Parameters stored fused in the model: HF suffix -> (fused suffix, position among the parts).
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0),
    "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", 1),
    "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", 2),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 1),
}
# In every release but never used at inference.
_UNUSED = re.compile(
    r"^(gen_vision_model\.encoder\.|gen_vision_model\.quant_conv\.|gen_vision_model\.quantize\.codebook_used$"
    r"|vision_model\.vision_tower\.attn_pool\.|.*\.rotary_emb\.inv_freq$)"
)

_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "model_state.pdparams.index.json",
    "model_state.pdparams",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def load_model(folder: str | Path, dtype: str | None = None, device: str | None = None,
               skip: tuple[str, ...] = ()) -> JanusModel:
    """Load a Janus checkpoint folder into an eval-mode JanusModel (float32 on CPU).

    `dtype` ('float32', 'bfloat16', 'float16') applies on GPU only; `device` ('cpu', 'gpu:0')
    becomes Paddle's current device. `skip`: prefixes of parameter names not to read (they stay
    unallocated: for parts that run from programs compiled earlier, model/cpu_programs.py); the
    checkpoint still has to hold them, with the right shapes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"config.json is missing in {folder}")
    config = JanusConfig.from_file(config_path)
    dtype = _resolve_dtype(dtype, device)

    checkpoint = _open_checkpoint(folder)
    checkpoint.split_fused(config.language)
    shapes = checkpoint.shapes()
    try:
        config = config.with_checkpoint_shapes(shapes)
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint.description}: {exc}") from exc
    with paddle.LazyGuard():
        model = JanusModel(config, dtype=dtype)
    params = dict(model.named_parameters())
    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}

    expected = expected_hf_shapes(config)
    parts_by_name: dict[str, dict[int, str]] = {}
    for key in expected:
        name, part = _model_name(key)
        parts_by_name.setdefault(name, {})[part] = key
    sources = {name: [parts[i] for i in sorted(parts)] for name, parts in parts_by_name.items()}
    if set(sources) != set(params):
        raise AssertionError(f"weight table and model disagree: {sorted(set(sources) ^ set(params))[:10]}")
    linear_keys = {key for name, keys in sources.items() if name in linear_weights for key in keys}
    try:
        _check_keys_and_shapes(checkpoint, shapes, expected, linear_keys)
        for name, keys in sources.items():
            if skip and name.startswith(skip):
                continue
            parts = [_to_paddle_layout(checkpoint.read(key), key in linear_keys, checkpoint.paddle_layout) for key in keys]
            value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            param = params[name]
            target = str(param.dtype).replace("paddle.", "")
            param.set_value(value if target == "float32" else paddle.to_tensor(value).astype(target))
            del parts, value
    finally:
        checkpoint.close()
    model.eval()
    for param in model.parameters():
        param.stop_gradient = True
    if paddle.get_device().startswith("cpu"):
        keep_freed_memory()  # after loading, so that the load's temporary arrays go back to the OS
    log.info("loaded %s (%s) as %s", folder, checkpoint.description, dtype)
    return model


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS.

    Paddle allocates a fresh output for every op; by default glibc maps large blocks
    with mmap and unmaps them on free, so every large activation or cache gather page-faults
    again on each step (measured 3-5x slower copies). The process keeps its peak memory
    instead. Returns False where glibc's mallopt is unavailable.
    """
    from .cpu_memory import libc

    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _model_name(hf_key: str) -> tuple[str, int]:
    name = hf_key
    for old, new in _MODEL_RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    for suffix, (fused, part) in _FUSED.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + fused, part
    return name, 0


def _to_paddle_layout(array: np.ndarray, is_linear: bool, paddle_layout: bool) -> np.ndarray:
    # PyTorch Linear weights are [out, in]; Paddle's are [in, out]. Nothing else differs.
    return _transpose(array) if is_linear and not paddle_layout else array


def _transpose(matrix: np.ndarray, tile: int = 128) -> np.ndarray:
    """matrix.T as a new contiguous array, tile by tile: twice as fast as one strided copy."""
    rows, cols = matrix.shape
    out = np.empty((cols, rows), matrix.dtype)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[j:j + tile, i:i + tile] = matrix[i:i + tile, j:j + tile].T
    return out


def _check_keys_and_shapes(checkpoint: "_Checkpoint", shapes: dict[str, tuple[int, ...]],
                           expected: dict[str, tuple[int, ...]], linear_keys: set[str]) -> None:
    missing = [key for key in expected if key not in shapes]
    unexpected = [key for key in shapes if key not in expected and not _UNUSED.match(key)]
    mismatched = []
    for key, want in expected.items():
        have = shapes.get(key)
        if have is None:
            continue
        if checkpoint.paddle_layout and key in linear_keys:
            want = tuple(reversed(want))
        if tuple(have) != want:
            mismatched.append(f"{checkpoint.stored_name(key)}: checkpoint {list(have)}, model {list(want)}")
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing([checkpoint.stored_name(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing([checkpoint.stored_name(k) for k in unexpected])}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{checkpoint.description} does not match the config: " + "; ".join(problems))


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _resolve_dtype(dtype: str | None, device: str | None) -> str:
    if device is not None:
        paddle.set_device(device)
    on_cpu = paddle.get_device().startswith("cpu")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    dtype = aliases.get(str(dtype), dtype) if dtype is not None else ("float32" if on_cpu else "bfloat16")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if on_cpu and dtype != "float32":
        warnings.warn(f"Paddle has no {dtype} kernels on CPU; loading in float32", stacklevel=3)
        dtype = "float32"
    return dtype


class _Checkpoint:
    """Tensors of one checkpoint by HF name. Subclasses give _stored_shapes(), _read(key) -> float32 array in
    the stored layout, and close(); shapes() and read() add the parts of fused projections (split_fused)."""

    def __init__(self, description: str, paddle_layout: bool):
        self.description = description
        self.paddle_layout = paddle_layout
        self._stored: dict[str, str] = {}  # HF name -> name in the file
        self._parts: dict[str, tuple[str, np.ndarray]] = {}  # part's HF name -> (fused HF name, its columns)
        self._held: dict[str, list] = {}  # fused HF name -> [array, parts not read yet]

    def _index(self, stored_names) -> None:
        for stored in stored_names:
            name = stored
            for old, new in _CANONICAL_PREFIXES:
                if name.startswith(old):
                    name = new + name[len(old):]
            self._stored[name] = stored

    def stored_name(self, key: str) -> str:
        return self._stored.get(key, key)

    def split_fused(self, language) -> None:
        """Read a Paddle-layout checkpoint's fused projections (PaddleNLP's fuse_attention_qkv /
        fuse_attention_ffn) as the separate q/k/v and gate/up weights of the HF names."""
        if not self.paddle_layout:
            return
        for key, shape in self._stored_shapes().items():
            where = f"{self.description}: {self.stored_name(key)}"
            for part, columns in _fused_columns(key, shape, language, where).items():
                self._parts[part] = (key, columns)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self._stored_shapes()
        for part, (fused, columns) in self._parts.items():
            shapes[part] = (shapes[fused][0], len(columns))
        for fused, _ in self._parts.values():
            shapes.pop(fused, None)
        return shapes

    def read(self, key: str) -> np.ndarray:
        if key not in self._parts:
            return self._read(key)
        fused, columns = self._parts[key]
        if fused not in self._held:  # read once, kept until its last part is taken
            self._held[fused] = [self._read(fused), sum(f == fused for f, _ in self._parts.values())]
        held = self._held[fused]
        held[1] -= 1
        if not held[1]:
            del self._held[fused]
        return held[0][:, columns]

    def close(self) -> None:
        """Release what the reader holds open (nothing for files read on demand)."""


class _SafetensorsCheckpoint(_Checkpoint):
    """One or more .safetensors files, memory-mapped and read one tensor at a time."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
               "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}

    def __init__(self, files: list[Path], description: str):
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        formats = set()
        for path in files:
            header, data_start = self._read_header(path)
            metadata = header.pop("__metadata__", None)
            formats.add(metadata.get("format") if isinstance(metadata, dict) else None)
            for name, entry in header.items():
                self._entries[name] = (path, entry, data_start)
        llama_keys = any(k.startswith("language_model.llama.") for k in self._entries)
        super().__init__(description, paddle_layout=llama_keys and "pt" not in formats)
        self._index(self._entries)

    @classmethod
    def _read_header(cls, path: Path) -> tuple[dict, int]:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is truncated: {size} bytes, no safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path} is truncated or not safetensors: header of {header_len} bytes, file of {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path} has a damaged safetensors header: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a damaged safetensors header")
        data_start = 8 + header_len
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(cls._DTYPES[entry["dtype"]])
                begin, stop = (int(x) for x in entry["data_offsets"])
                count = int(np.prod(entry["shape"], dtype=np.int64))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: tensor {name} has an unsupported or damaged entry {entry!r}") from exc
            if stop - begin != count * dtype.itemsize:
                raise CheckpointError(f"{path}: tensor {name} has {stop - begin} bytes for shape {entry['shape']}")
            end = max(end, stop)
        if data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated: the header describes {data_start + end} bytes, the file has {size}"
            )
        return header, data_start

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._entries[stored][1]["shape"]) for name, stored in self._stored.items()}

    def _read(self, key: str) -> np.ndarray:
        path, entry, data_start = self._entries[self._stored[key]]
        begin, stop = entry["data_offsets"]
        dtype = np.dtype(self._DTYPES[entry["dtype"]])
        # A plain read, not a memory map: mapped pages would stay resident beside the model.
        raw = np.fromfile(path, dtype=dtype, count=(stop - begin) // dtype.itemsize, offset=data_start + begin)
        if entry["dtype"] == "BF16":
            # bfloat16 is the top half of a float32.
            array = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.astype(np.float32, copy=False)
        return array.reshape(entry["shape"])


class _PdparamsCheckpoint(_Checkpoint):
    """PaddleNLP's model_state.pdparams, or its shards (model_state-00001-of-0000N.pdparams, listed by
    model_state.pdparams.index.json, as save_pretrained writes a large model): each file loaded whole
    by paddle.load, then released tensor by tensor."""

    def __init__(self, files: list[Path], description: str):
        state: dict = {}
        for path in files:
            try:
                part = paddle.load(str(path), return_numpy=True)
            except Exception as exc:  # paddle.load raises pickle/EOF/ValueError/... for damaged files
                raise CheckpointError(f"{path} cannot be read by paddle.load (damaged or truncated?): {exc}") from exc
            if not isinstance(part, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            twice = sorted(set(part) & set(state))
            if twice:
                raise CheckpointError(f"{path.name} repeats tensors of another shard: {_listing(twice)}")
            state.update(part)
        super().__init__(f"{description} (PaddleNLP layout)", paddle_layout=True)
        self._state = state
        self._index(state)

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(np.shape(self._state[stored])) for name, stored in self._stored.items()}

    def _read(self, key: str) -> np.ndarray:
        array = np.asarray(self._state.pop(self._stored[key]))
        if array.dtype == np.uint16:
            # paddle.save stores bfloat16 tensors as uint16 arrays.
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32, copy=False)

    def close(self) -> None:
        self._state.clear()


def _fused_columns(key: str, shape: tuple[int, ...], language, where: str) -> dict[str, np.ndarray]:
    """For PaddleNLP's fused projections (config fuse_attention_qkv / fuse_attention_ffn), the name of each
    part (key's "qkv_proj" -> "q_proj", ...) and its columns; {} for other tensors. `where` names the
    tensor in errors. Both are [in, out] in the Paddle layout.

    qkv_proj's columns run per key/value head: that head's queries (num_attention_heads /
    num_key_value_heads of them), then its key, then its value, head_dim columns each (PaddleNLP's
    LlamaAttention reshapes to [kv_heads, (groups + 2) * head_dim] and splits). gate_up_fused_proj's
    columns are gate, then up (its swiglu chunks the output in two).
    """
    for fused in ("self_attn.qkv_proj.weight", "mlp.gate_up_fused_proj.weight"):
        if key.endswith("." + fused):
            base = key[: -len(fused)] + fused.split(".")[0] + "."
            break
    else:
        return {}
    if len(shape) != 2:
        raise CheckpointError(f"{where} has shape {list(shape)}, not [in, out]")
    cols = shape[1]
    if fused.startswith("self_attn."):
        heads, kv_heads, head_dim = language.num_attention_heads, language.num_key_value_heads, language.head_dim
        groups = heads // kv_heads
        if cols != (heads + 2 * kv_heads) * head_dim:
            raise CheckpointError(
                f"{where} has {cols} output columns; the config's {heads} heads and {kv_heads} "
                f"key/value heads of {head_dim} need {(heads + 2 * kv_heads) * head_dim}")
        per_head = np.arange(cols).reshape(kv_heads, groups + 2, head_dim)
        return {base + "q_proj.weight": per_head[:, :groups].ravel(),
                base + "k_proj.weight": per_head[:, groups].ravel(),
                base + "v_proj.weight": per_head[:, groups + 1].ravel()}
    if cols % 2:
        raise CheckpointError(f"{where} has an odd number of output columns ({cols})")
    return {base + "gate_proj.weight": np.arange(cols // 2), base + "up_proj.weight": np.arange(cols // 2, cols)}


class _TorchStorage:
    def __init__(self, dtype_name: str, key: str, numel: int):
        self.dtype_name, self.key, self.numel = dtype_name, key, numel


class _TorchTensor:
    def __init__(self, storage: _TorchStorage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)


def _rebuild_tensor(storage, offset, shape, stride, *_):
    return _TorchTensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *_):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Reads the data.pkl of a torch.save zip without torch, allowing only state-dict objects."""

    _GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _TorchZipCheckpoint.DTYPES:
            return name
        try:
            return self._GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(f"unsupported object {module}.{name} in a PyTorch checkpoint") from None

    def persistent_load(self, pid):
        kind, dtype_name, key, _location, numel = pid
        if kind != "storage" or dtype_name not in _TorchZipCheckpoint.DTYPES:
            raise CheckpointError(f"unsupported storage {pid!r} in a PyTorch checkpoint")
        return _TorchStorage(dtype_name, str(key), int(numel))


class _TorchZipCheckpoint(_Checkpoint):
    """pytorch_model*.bin in torch.save's zip format, read without torch, one storage at a time."""

    DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
              "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
              "ByteStorage": np.uint8, "BoolStorage": np.bool_}

    def __init__(self, files: list[Path], description: str):
        self._entries: dict[str, tuple[zipfile.ZipFile, str, _TorchTensor]] = {}
        self._archives = []
        for path in files:
            try:
                archive = zipfile.ZipFile(path)
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if len(pickles) != 1:
                    raise CheckpointError(f"{path} is not a torch.save zip archive (no single data.pkl)")
                prefix = pickles[0][: -len("data.pkl")]
                with archive.open(pickles[0]) as f:
                    state = _TorchUnpickler(f).load()
            except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (damaged or truncated?): {exc}") from exc
            if not isinstance(state, dict) or not all(isinstance(v, _TorchTensor) for v in state.values()):
                raise CheckpointError(f"{path} does not hold a state dict of tensors")
            self._archives.append(archive)
            for name, tensor in state.items():
                self._entries[name] = (archive, prefix, tensor)
        super().__init__(description, paddle_layout=False)
        self._index(self._entries)

    def _stored_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._entries[stored][2].shape for name, stored in self._stored.items()}

    def _read(self, key: str) -> np.ndarray:
        archive, prefix, tensor = self._entries[self._stored[key]]
        dtype = np.dtype(self.DTYPES[tensor.storage.dtype_name])
        try:
            data = np.frombuffer(archive.read(f"{prefix}data/{tensor.storage.key}"), dtype=dtype)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"storage of {key} is missing or damaged in the PyTorch checkpoint: {exc}") from exc
        needed = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) + 1
        if data.size < needed and np.prod(tensor.shape) > 0:
            raise CheckpointError(f"storage of {key} holds {data.size} values, the tensor needs {needed}")
        array = np.lib.stride_tricks.as_strided(
            data[tensor.offset:], shape=tensor.shape, strides=[s * dtype.itemsize for s in tensor.stride]
        )
        if tensor.storage.dtype_name == "BFloat16Storage":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)

    def close(self) -> None:
        for archive in self._archives:
            archive.close()


def _weight_map_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({index.parent / name for name in weight_map.values()})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index} is not a valid checkpoint index: {exc}") from exc
    absent = [p.name for p in files if not p.is_file()]
    if absent:
        raise CheckpointError(f"{index.name} lists shard files missing from {index.parent}: {', '.join(absent)}")
    return files


def _open_checkpoint(folder: Path) -> _Checkpoint:
    """The first weights found, in the order of _WEIGHT_FILES."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = _weight_map_files(index)
        return _SafetensorsCheckpoint(files, f"{index.name} ({len(files)} shards)")
    if (folder / "model.safetensors").is_file():
        return _SafetensorsCheckpoint([folder / "model.safetensors"], "model.safetensors")
    index = folder / "model_state.pdparams.index.json"
    if index.is_file():
        files = _weight_map_files(index)
        return _PdparamsCheckpoint(files, f"{index.name} ({len(files)} shards)")
    if (folder / "model_state.pdparams").is_file():
        return _PdparamsCheckpoint([folder / "model_state.pdparams"], "model_state.pdparams")
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        files = _weight_map_files(index)
        return _TorchZipCheckpoint(files, f"{index.name} ({len(files)} shards)")
    if (folder / "pytorch_model.bin").is_file():
        return _TorchZipCheckpoint([folder / "pytorch_model.bin"], "pytorch_model.bin")
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(_WEIGHT_FILES)}")
