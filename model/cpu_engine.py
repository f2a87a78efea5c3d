"""CPU decode backend: the LLaMA stack through Paddle Inference's OpenVINO engine, float32.

Why: on CPU one decode step reads every weight once, so its speed is set by how close
the matmul kernels get to memory bandwidth. Measured on the 2-core dev box (bench/
cpu_decode_floor.py, full-size LM, 64 cached tokens): eager fp32 (MKL) ~410-470 ms at batch 2,
~1080-1290 ms at batch 8; this engine ~180-220 ms and ~320-370 ms, its programs streaming
the weights at ~29 GB/s, about what a read-only pass over a large array achieves there.

How: the weight-heavy parts of each layer run as OpenVINO programs exported from the
eager model's own parameters, one program per gap between two attentions:

    first:     x -> input norm -> qkv -> rotary                         (layer 0)
    mid[i]:    attn, res -> o_proj + residual -> MLP block + residual    (layer i)
                            -> input norm -> qkv -> rotary               (layer i+1)
    last:      attn, res -> o_proj + residual -> MLP block -> final norm (last layer)

Attention runs between them in numpy, directly on zero-copy views of the eager
KVCache tensors (same blocked layout, written in place), because the OpenVINO
engine op memcpys every input on every call: a cache fed to it would be copied whole
each step. The programs have one dynamic dimension (rows = batch x tokens), which
OpenVINO handles without recompiling (a new row count costs nothing measurable), so
batch size and attended length may change freely from step to step; the attended
length never enters a program. The same path runs prefill (T > 1).

Numerics are float32 throughout and match eager to ~5e-6 relative; any error from
the engine is only logged by Paddle, so every call checks output shapes and the tests
compare against eager.

Usage (see CpuDecodeEngine):
    engine = CpuDecodeEngine(model)                   # model: JanusModel / LlamaForCausalLM / LlamaModel
    hidden = engine.forward_hidden(embeds, cache, slots, start)   # = model.forward_hidden(...)
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import tempfile
import time

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .cpu_attention import Group, attend, plan_groups, write_cache
from .llama import KVCache, LlamaModel, cache_addresses, rotary_cos_sin
from .tensors import from_numpy

_BUILD_IDS = itertools.count()


class EngineUnavailable(RuntimeError):
    """This Paddle wheel cannot run the OpenVINO engine (no OpenVINO support compiled in)."""


def cpu_threads() -> int:
    """The CPU threads this process is meant to use: OMP_NUM_THREADS (the worker sets it), else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def find_llama(model) -> LlamaModel:
    """The LlamaModel inside a JanusModel, a LlamaForCausalLM or itself."""
    for path in ((), ("model",), ("language_model", "model")):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, LlamaModel):
            return obj
    raise TypeError(f"no LlamaModel found in {type(model).__name__}")


def openvino_available() -> bool:
    return hasattr(paddle.inference.Config, "enable_openvino_engine") and any(
        name.startswith("libopenvino") for name in os.listdir(os.path.join(os.path.dirname(paddle.__file__), "libs")))


def _rms_norm(x, weight, eps):
    # `** -0.5` rather than rsqrt: rsqrt does not export in the program format OpenVINO reads.
    return x * ((x * x).mean(axis=-1, keepdim=True) + eps) ** -0.5 * weight


class _Part(nn.Layer):
    """The weights between two attentions; shares the eager Parameters (no copy)."""

    def __init__(self, llama: LlamaModel, before: int | None, after: int | None):
        super().__init__()
        c = llama.config
        self.eps = float(c.rms_norm_eps)
        self.hidden = c.hidden_size
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.before, self.after = before, after
        if before is not None:  # finishes layer `before`: o_proj, residual, MLP block
            layer = llama.layers[before]
            self.o_w = layer.self_attn.o_proj.weight
            self.post_w = layer.post_attention_layernorm.weight
            self.gate_up_w = layer.mlp.gate_up_proj.weight
            self.down_w = layer.mlp.down_proj.weight
        if after is not None:  # starts layer `after`: input norm, qkv, rotary
            layer = llama.layers[after]
            self.in_w = layer.input_layernorm.weight
            self.qkv_w = layer.self_attn.qkv_proj.weight
        else:
            self.final_w = llama.norm.weight

    def _start(self, x, cos, sin):
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        qkv = _rms_norm(x, self.in_w, self.eps) @ self.qkv_w
        qk, v = paddle.split(qkv, [qk_width, self.kv_heads * self.head_dim], axis=-1)
        qk = qk.reshape([-1, self.heads + self.kv_heads, self.head_dim])
        half = self.head_dim // 2
        rotated = paddle.concat([-qk[:, :, half:], qk[:, :, :half]], axis=-1)
        return qk * cos + rotated * sin, v.reshape([-1, self.kv_heads, self.head_dim])

    def _finish(self, attn, res):
        h = res + attn @ self.o_w
        gate, up = paddle.split(_rms_norm(h, self.post_w, self.eps) @ self.gate_up_w, 2, axis=-1)
        return h + (F.silu(gate) * up) @ self.down_w

    def input_spec(self, tag: str):
        spec = paddle.static.InputSpec
        hidden, d = self.hidden, self.head_dim
        rot = [spec([None, 1, d], "float32", f"cos_{tag}"), spec([None, 1, d], "float32", f"sin_{tag}")]
        if self.before is None:
            return [spec([None, hidden], "float32", f"x_{tag}")] + rot
        head = [spec([None, self.heads * d], "float32", f"attn_{tag}"), spec([None, hidden], "float32", f"res_{tag}")]
        return head if self.after is None else head + rot


class _First(_Part):
    def forward(self, x, cos, sin):
        return self._start(x, cos, sin)


class _Mid(_Part):
    def forward(self, attn, res, cos, sin):
        h = self._finish(attn, res)
        qk, v = self._start(h, cos, sin)
        return h, qk, v


class _Last(_Part):
    def forward(self, attn, res):
        return _rms_norm(self._finish(attn, res), self.final_w, self.eps)


def _make_part(llama: LlamaModel, before: int | None, after: int | None) -> _Part:
    kind = _First if before is None else _Last if after is None else _Mid
    return kind(llama, before, after)


def _export(part: nn.Layer, spec, path: str) -> str:
    """Save `part` as a static program at path(.pdmodel/.pdiparams); returns path.

    The old program format, because both of its readers need it: Paddle Inference's OpenVINO
    engine (a PIR export would silently run without OpenVINO) and the openvino package's
    Paddle frontend (it cannot read PIR's .json).
    """
    with paddle.pir_utils.DygraphOldIrGuard():
        static = paddle.jit.to_static(part, input_spec=spec, full_graph=True)
        paddle.jit.save(static, path, input_spec=spec)
    return path


class _Program:
    """One exported part run by a Paddle Inference predictor with the OpenVINO engine."""

    def __init__(self, part: _Part, folder: str, tag: str, threads: int, engine: str):
        spec = part.input_spec(tag)
        path = _export(part, spec, os.path.join(folder, "part"))
        config = paddle.inference.Config(path + ".pdmodel", path + ".pdiparams")
        config.set_cpu_math_library_num_threads(threads)
        config.disable_glog_info()
        if engine == "openvino":
            config.enable_openvino_engine(paddle.inference.PrecisionType.Float32)
            # Paddle would otherwise write the compiled blob to ./__cache__ (empty means that, not "off").
            config.set_optim_cache_dir(os.path.join(folder, "ov_cache"))
        elif engine == "onednn":
            config.enable_onednn()
        else:
            config.disable_onednn()
        self.predictor = paddle.inference.create_predictor(config)
        # Proof that OpenVINO compiled the program (it writes its blob into the cache dir then).
        blobs = os.path.join(folder, "ov_cache")
        self.compiled_by_openvino = os.path.isdir(blobs) and any(f.endswith(".blob") for f in os.listdir(blobs))
        if engine == "openvino" and not self.compiled_by_openvino:
            raise EngineUnavailable("Paddle Inference did not hand the program to OpenVINO")
        self.inputs = [self.predictor.get_input_handle(n) for n in self.predictor.get_input_names()]
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]
        if len(self.inputs) != len(spec):
            raise RuntimeError(f"exported program has {len(self.inputs)} inputs, expected {len(spec)}")

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        for handle, array in zip(self.inputs, arrays):
            handle.copy_from_cpu(array)
        self.predictor.run()
        outs = [h.copy_to_cpu() for h in self.outputs]
        rows = arrays[0].shape[0]
        # The engine op logs its errors instead of raising; a stale or empty output shows in its shape.
        if any(o.shape[0] != rows for o in outs):
            raise RuntimeError(f"engine output rows {[o.shape for o in outs]} != input rows {rows}")
        return outs


@dataclasses.dataclass
class _Plan:
    cos: np.ndarray  # [N, 1, D]
    sin: np.ndarray
    write_block: np.ndarray  # [N]
    write_slot: np.ndarray
    write_offset: np.ndarray
    groups: list[Group]
    batch: int
    length: int


class CpuDecodeEngine:
    """Runs `forward_hidden` of the eager LLaMA stack through OpenVINO, on the eager model's KV cache.

    engine = CpuDecodeEngine(model)      # exports + compiles once: 40-60 s for Janus-1.3B on 2 cores
    hidden = engine.forward_hidden(embeds, cache, slots, start)
        exactly the contract of model.forward_hidden: embeds [B, T, H] (Paddle tensor or
        numpy), slots/start [B] ints; returns the final-normed float32 hidden [B, T, H]
        as a Paddle tensor and writes the new keys/values into `cache` in place, so eager
        and engine calls can be mixed on one cache (e.g. eager prefill, engine decode).

    `cache` is a float32 KVCache from this model's new_cache; the engine keeps zero-copy
    numpy views of its tensors. `engine` may be "openvino" (default), "onednn" or "plain"
    (Paddle Inference without OpenVINO, for comparison). Not thread-safe: one caller.
    Paddle never frees OpenVINO engines, so build one per model and process.

    Memory: OpenVINO keeps about 2.2x the exported weights (its parsed model and its
    packed copy: ~10.8 GB for Janus-1.3B's 4.9 GB of layers). `release_eager_weights=True`
    frees the eager layer weights (and final norm) once exported, saving 4.9 GB; the eager
    stack (model.forward_hidden) then fails loudly, so every call, prefill included, must go
    through this engine. Embeddings and heads stay eager either way.
    """

    def __init__(self, model, *, threads: int | None = None, engine: str = "openvino",
                 workdir: str | None = None, release_eager_weights: bool = False):
        self.llama = find_llama(model)
        c = self.llama.config
        if engine not in ("openvino", "onednn", "plain"):
            raise ValueError(f"unknown engine {engine!r}")
        if engine == "openvino" and not openvino_available():
            raise EngineUnavailable("this paddlepaddle wheel has no OpenVINO engine")
        if self.llama.norm.weight.dtype != paddle.float32:
            raise ValueError("CpuDecodeEngine is float32 only; the model is " + str(self.llama.norm.weight.dtype))
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.hidden = c.hidden_size
        self.scale = np.float32(1.0 / np.sqrt(self.head_dim))
        self.inv_freq = self.llama.inv_freq
        self.engine = engine
        self.threads = threads or cpu_threads()
        self.cache = None
        layers = len(self.llama.layers)
        tag = f"{os.getpid()}_{next(_BUILD_IDS)}"  # unique names: Paddle keys OpenVINO engines by var names
        root = tempfile.mkdtemp(prefix="janus-cpu-engine-", dir=workdir)
        started = time.perf_counter()
        try:
            bounds = [(None, 0)] + [(i, i + 1) for i in range(layers - 1)] + [(layers - 1, None)]
            self.programs = []
            for index, (before, after) in enumerate(bounds):
                folder = os.path.join(root, str(index))
                os.makedirs(folder)
                part = _make_part(self.llama, before, after)
                self.programs.append(_Program(part, folder, f"{tag}_{index}", self.threads, engine))
                if release_eager_weights:
                    for param in part.parameters():
                        param._clear_data()  # the program holds its own copy now
                # OpenVINO holds the weights in memory once compiled: the files are no longer needed.
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        self.build_seconds = time.perf_counter() - started

    def _bind_cache(self, cache: KVCache) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if cache.k[0].dtype != paddle.float32:
            raise ValueError("CpuDecodeEngine needs a float32 KV cache")
        if len(cache.k) != len(self.llama.layers):
            raise ValueError(f"the cache has {len(cache.k)} layers, the model {len(self.llama.layers)}")
        self.cache = cache
        self._k_src, self._v_src = list(cache.k), list(cache.v)
        # Zero-copy views: writes land in the Paddle tensors that eager forward_hidden reads.
        self._k = [np.from_dlpack(t) for t in cache.k]
        self._v = [np.from_dlpack(t) for t in cache.v]
        for view in self._k + self._v:
            if view.ndim != 5 or view.shape[2] != self.kv_heads or view.shape[4] != self.head_dim:
                raise ValueError(f"cache layout {list(view.shape)} does not fit {self.kv_heads} kv heads x {self.head_dim}")
            if not view.flags.writeable:
                raise RuntimeError("the KV cache view is read-only")

    def _use_cache(self, cache: KVCache) -> None:
        # Views are made once per cache; a swapped tensor inside it would leave them stale.
        if cache is not self.cache or any(
                a is not b for a, b in zip(cache.k + cache.v, self._k_src + self._v_src)):
            self._bind_cache(cache)

    def plan(self, cache: KVCache, slots, start, batch: int, length: int) -> _Plan:
        slots, _, positions = cache_addresses(cache, slots, start, batch, length)  # positions [B, T]
        cos, sin = rotary_cos_sin(positions.reshape(-1), self.inv_freq)
        groups = plan_groups(slots, positions, cache.block_size)
        bs = cache.block_size
        return _Plan(cos=np.ascontiguousarray(cos[:, None, :]), sin=np.ascontiguousarray(sin[:, None, :]), write_block=(positions // bs).reshape(-1),
                     write_slot=np.repeat(slots, length), write_offset=(positions % bs).reshape(-1),
                     groups=groups, batch=batch, length=length)

    def _attend(self, layer: int, qk: np.ndarray, v: np.ndarray, plan: _Plan) -> np.ndarray:
        """Write this step's keys/values into the cache, then attend over each row's prefix; [N, heads*D]."""
        heads, kv_heads = self.heads, self.kv_heads
        kc, vc = self._k[layer], self._v[layer]
        write_cache(kc, vc, (plan.write_block, plan.write_slot, plan.write_offset), qk[:, heads:], v)
        return attend(qk[:, :heads], kc, vc, plan.groups, kv_heads=kv_heads, length=plan.length, scale=self.scale)

    def forward_hidden(self, embeds, cache: KVCache, slots, start) -> paddle.Tensor:
        x = embeds.numpy() if isinstance(embeds, paddle.Tensor) else np.asarray(embeds)
        if x.ndim != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"embeds must be [batch, tokens, {self.hidden}], got shape {list(x.shape)}")
        batch, length, _ = x.shape
        self._use_cache(cache)
        plan = self.plan(cache, slots, start, batch, length)
        hidden = self.run(np.ascontiguousarray(x.reshape(batch * length, self.hidden), dtype=np.float32), plan)
        return from_numpy(hidden.reshape(batch, length, self.hidden))

    def step(self, embeds, cache: KVCache, slots, start) -> paddle.Tensor:
        """One decode step: embeds [B, H] or [B, 1, H] -> final-normed hidden [B, H]."""
        x = embeds.numpy() if isinstance(embeds, paddle.Tensor) else np.asarray(embeds)
        x = x.reshape(x.shape[0], -1, self.hidden)
        if x.shape[1] != 1:
            raise ValueError(f"step takes one token per row, got {x.shape[1]}")
        return self.forward_hidden(x, cache, slots, start)[:, 0]

    def run(self, x: np.ndarray, plan: _Plan) -> np.ndarray:
        """Rows x [B*T, H] float32 (batch-major) -> final-normed hidden [B*T, H], on the bound cache."""
        qk, v = self.programs[0](x, plan.cos, plan.sin)
        res = x
        last = len(self.programs) - 2
        for layer, program in enumerate(self.programs[1:]):
            attn = self._attend(layer, qk, v, plan)
            if layer < last:
                res, qk, v = program(attn, res, plan.cos, plan.sin)
            else:
                (res,) = program(attn, res)
        return res



class _LayoutFreeGroupNorm(nn.Layer):
    """GroupNorm written for OpenVINO: statistics from per-channel means over the pixels.

    Paddle's group_norm reaches OpenVINO as reshape [N, groups, -1] + MVN + reshape, and those
    reshapes pin the plain NCHW layout: OpenVINO then reorders every convolution's output out of
    its blocked layout and back, with a slow generic reorder. Measured on janus-tiny's decoder,
    one thread: 245 of 780 ms went to reorders. Here each channel's mean over the pixels is
    averaged within its group by a small [C, C] matmul, so the full-size tensors only see
    layout-free elementwise ops and reductions. Two passes, as the reference computes it:
    mean, then the mean square of the centred values. Shares the norm's weight and bias.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        channels, groups = int(norm._num_channels), int(norm._num_groups)
        size = channels // groups
        self.channels, self.eps = channels, float(norm._epsilon)
        self.weight, self.bias = norm.weight, norm.bias
        average = np.kron(np.eye(groups), np.full((size, size), 1.0 / size)).astype(np.float32)
        self.register_buffer("average", paddle.to_tensor(average))

    def _group_mean(self, x):  # [N, C, H, W] -> each channel's group mean, [N, C, 1, 1]
        return (x.mean(axis=[2, 3]) @ self.average).reshape([0, self.channels, 1, 1])

    def forward(self, x):
        centered = x - self._group_mean(x)
        scale = (self._group_mean(centered * centered) + self.eps) ** -0.5 * self.weight.reshape([1, -1, 1, 1])
        return centered * scale + self.bias.reshape([1, -1, 1, 1])


@contextlib.contextmanager
def _layout_free_group_norms(layer: nn.Layer):
    """Swap every GroupNorm inside `layer` for a _LayoutFreeGroupNorm (same parameters) while exporting."""
    swapped = []
    for parent in [layer, *layer.sublayers()]:
        for name, child in list(parent._sub_layers.items()):
            if isinstance(child, nn.GroupNorm):
                parent._sub_layers[name] = _LayoutFreeGroupNorm(child)
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            parent._sub_layers[name] = child


class _VQPart(nn.Layer):
    """post_quant_conv + decoder of the VQ model; shares the eager Parameters."""

    def __init__(self, vq, side: int):
        super().__init__()
        self.post_quant_conv = vq.post_quant_conv
        self.decoder = vq.decoder
        self.channels = int(vq.config.codebook_dim)
        self.side = side

    def input_spec(self, tag: str):
        return [paddle.static.InputSpec([None, self.channels, self.side, self.side], "float32", f"z_{tag}")]

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class CompiledCopies:
    """An OpenVINO model compiled for the CPU in float32 on `threads` threads and, with
    `single_thread_copy`, also on one (its own copy of the weights), for when decode steps
    run on the other cores. Used by CpuVQDecoder and model/cpu_vision.CpuVisionEncoder.

    CPU pinning is off. By default OpenVINO pins the threads of a run to cores, a one-thread
    run always to the first core of the process's set, so two one-thread runs at once (the
    worker's VQ thread and the prefill process's image encoder) share one core while the other
    may idle. Measured on the 2-core dev box: with janus-tiny, a one-thread VQ decode beside a
    loop of one-thread image encodes took 1.93-1.97x as long as alone when pinned, 1.01-1.02x
    unpinned; with Janus-1.3B's sizes (random weights), a one-thread VQ decode (7.3-7.6 s alone)
    and a one-thread image encode (5.3-5.4 s) started together were both done after 14.0 s
    pinned and 7.8 s unpinned. Alone, each took the same time either way.
    """

    def __init__(self, graph, threads: int, single_thread_copy: bool):
        import openvino

        core = openvino.Core()
        self.threads = threads
        counts = sorted({threads, 1} if single_thread_copy else {threads})
        self.compiled = {n: core.compile_model(graph, "CPU", {
            "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": n,
            "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}) for n in counts}
        self.requests = {n: compiled.create_infer_request() for n, compiled in self.compiled.items()}

    def infer(self, inputs: dict, *, single_thread: bool = False):
        """The outputs of one run, on the one-thread copy if `single_thread` and it was built."""
        request = self.requests[1] if single_thread and 1 in self.requests else self.requests[self.threads]
        return request.infer(inputs)


def openvino_runtime_available() -> bool:
    """The `openvino` Python package (its infer() releases the GIL, unlike Paddle Inference's run())."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class CpuVQDecoder:
    """The VQ decoder (post_quant_conv + convolutional decoder) as one OpenVINO model, float32.

    Why: Paddle's CPU conv2d runs the decoder's 3x3 convolutions at ~11 GFLOP/s on the
    2-core dev box; OpenVINO runs them about 4x faster (janus-tiny: ~1.6 s -> ~0.4 s per
    384x384 image), with the same float32 numbers to ~2e-5.

    decoder = CpuVQDecoder(model)            # model: JanusModel; exports + compiles once
    pixels = decoder.decode(codes)           # [N, 576] int codes -> [N, 3, 384, 384] float32 numpy

    The decoder is exported from the eager model's own parameters as a Paddle program and
    compiled by the `openvino` package's Paddle frontend, with float32 inference precision
    pinned (OpenVINO would otherwise pick bf16 on CPUs that have it). Its infer() releases
    the GIL, so a thread can decode images while the eager decode loop keeps stepping. The
    codebook lookup stays eager (one small gather); the batch size may change freely.
    decode() is not re-entrant: one caller at a time.

    `layout_free_norms=False` exports Paddle's own group_norm instead of _LayoutFreeGroupNorm
    (for comparison: bench/vq_bench.py).

    `single_thread_copy=True` also compiles a one-thread copy (its own copy of the VQ weights)
    for decode(..., single_thread=True): while decode steps run on the other cores, a VQ
    decode that takes them all only slows both down (measured: janus-tiny, 2 cores, 8
    concurrent image requests, ~0.85 -> ~1.0 images/s).
    """

    def __init__(self, model, *, threads: int | None = None, workdir: str | None = None,
                 image_tokens: int = 576, single_thread_copy: bool = False, layout_free_norms: bool = True):
        if not openvino_runtime_available():
            raise EngineUnavailable("the openvino package is not installed")
        import openvino

        self.vq = model.gen_vision_model
        if self.vq.post_quant_conv.weight.dtype != paddle.float32:
            raise ValueError("CpuVQDecoder is float32 only; the model is " + str(self.vq.post_quant_conv.weight.dtype))
        self.side = int(np.sqrt(image_tokens))
        if self.side * self.side != image_tokens:
            raise ValueError(f"{image_tokens} image tokens do not form a square grid")
        self.image_tokens = image_tokens
        self.threads = threads or cpu_threads()
        root = tempfile.mkdtemp(prefix="janus-cpu-vq-", dir=workdir)
        started = time.perf_counter()
        try:
            part = _VQPart(self.vq, self.side)
            with _layout_free_group_norms(part) if layout_free_norms else contextlib.nullcontext():
                path = _export(part, part.input_spec("vq"), os.path.join(root, "vq"))
            self.program = CompiledCopies(openvino.Core().read_model(path + ".pdmodel"), self.threads,
                                          single_thread_copy)
        finally:
            shutil.rmtree(root, ignore_errors=True)  # compiled: the weights live in OpenVINO now
        self.build_seconds = time.perf_counter() - started

    def latent(self, codes) -> np.ndarray:
        codes = np.asarray(codes, np.int64)
        if codes.ndim != 2 or codes.shape[1] != self.image_tokens:
            raise ValueError(f"codes must be [images, {self.image_tokens}], got shape {list(codes.shape)}")
        size = self.vq.config.codebook_size
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"image token codes must lie in [0, {size})")
        with paddle.no_grad():
            return self.vq.lookup(from_numpy(codes)).numpy()

    def decode(self, codes, *, single_thread: bool = False) -> np.ndarray:
        """`single_thread`: use the one-thread copy (if built), leaving the other cores to the decode loop."""
        z = np.ascontiguousarray(self.latent(codes), dtype=np.float32)
        pixels = np.array(self.program.infer({0: z}, single_thread=single_thread)[0], dtype=np.float32, copy=True)
        size = self.side * 2 ** (len(self.vq.config.ch_mult) - 1)
        if pixels.shape != (z.shape[0], 3, size, size):
            raise RuntimeError(f"VQ decoder output {list(pixels.shape)} for {z.shape[0]} images")
        return pixels
