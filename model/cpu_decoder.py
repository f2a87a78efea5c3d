"""The language model's decoder layers as OpenVINO programs built from the loaded weights (CPU).

Why: on CPU a decode step reads every weight once, so its speed is set by how close the
matrix products get to memory bandwidth. OpenVINO's CPU kernels stream float32 weights
faster than Paddle's or numpy's at the few rows of a decode step, and read int8 and 4-bit
weights directly (bench/cpu_bench.py measures all of them against the official code).

How: the weight-heavy parts of the layers run as OpenVINO programs, one per gap between
two attentions, built with OpenVINO's own operations on the eager model's parameters:

    first:     x -> input norm -> qkv -> rotary                          (layer 0)
    mid[i]:    attn, res -> o_proj + residual -> MLP block + residual     (layer i)
                             -> input norm -> qkv -> rotary               (layer i+1)
    last:      attn, res -> o_proj + residual -> MLP block -> final norm  (last layer)

Attention runs between them in numpy, on zero-copy views of the eager KVCache (written
in place, model/cpu_attention.py): a cache handed to a program would be copied at every
call. The programs have one dynamic dimension, the rows (batch x tokens), so batch size
and cached length change from step to step without a recompile, and a prompt's prefill
runs through the same programs (its attention over itself chunked and causal).

One copy of the weights: OpenVINO packs each program's weights into its own memory when
it compiles (checked by tests/test_cpu_engine.py, which poisons the eager memory after
the build), so the eager copies of the layers' weights and the final norm are freed then
(`release_eager=True`, what the worker does). model.forward_hidden then fails loudly;
every call, prefill included, goes through this decoder. Embeddings stay eager; the heads are
model/cpu_heads.py.

With a program store (model/cpu_programs.py, what the worker has by default) the programs are saved
once built and then run as imported from the saved file, as every later start runs them; the eager
weights are then freed outright. Without one, the eager memory the programs were built from is
given back by a page drop. That holds for the layers' shapes, and is checked at start
(model/cpu_memory.py), not for every shape: with janus-tiny's 64 x 64 image-head weights compiled
the same way, calls of 7 rows and more read the dropped memory (OpenVINO reorders a weight for a new
kernel on first use, from the original constant). So the heads run as programs only as imported
from a saved file, whose dropped pages are read back from the file (model/cpu_heads.py).

Precision (`precision`):
- "exact": float32 weights and compute; equal to eager within ~1e-5.
- "int8": each weight matrix as int8 with one float32 scale per output channel
  (symmetric); activations quantized to int8 per group of ACTIVATION_GROUP inputs as they enter
  each product. Lossy.
- "int4": 4-bit weights (symmetric, signed) in groups of 128 inputs (int4_group), one float32 scale per
  group (the OpenVINO Janus notebook compresses its language model so); activations as int8's.
  Lossy.
- "bf16": bfloat16 weights (OpenVINO packs the float32 ones so when it compiles) and compute, where the
  CPU has it (AMX or AVX512-BF16); refused elsewhere (`check_precision`). Lossy.

    decoder = CpuDecoder(model, precision="exact")           # model: JanusModel / LlamaForCausalLM / LlamaModel
    hidden = decoder.forward_hidden(embeds, cache, slots, start)   # = model.forward_hidden(...)
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import paddle

from .cpu_attention import Group, attend, plan_groups, prompt_attention, write_cache
from .cpu_memory import snapshot, trim_heap
from .cpu_programs import ProgramStore, ProgramStoreError
from .llama import KVCache, LlamaModel, cache_addresses, rotary_cos_sin
from .tensors import float32_view, from_numpy

log = logging.getLogger(__name__)

# The JanusModel parameters the programs hold (by name prefix): what the loader need not read when the
# programs are imported from a ProgramStore.
HELD_PARAMETERS = ("language_model.model.layers.", "language_model.model.norm.")

PRECISIONS = ("exact", "int8", "int4", "bf16")
INT4_GROUP = 128
# int8 and int4: the activations entering each weight product are quantized to int8 at run time, one scale per
# ACTIVATION_GROUP inputs (OpenVINO's dynamic quantization, as it runs weight-compressed LLMs by default), so the
# products run in integer arithmetic. Janus-1.3B's sizes, 2-core AVX-512 EPYC, against float32 activations: int8
# 2 rows 70 -> 62 ms, 32 rows 525 -> 239 ms, 620-token prefill 11.3 -> 6.2 s, logits' max relative error vs eager
# 5.3e-2 -> 6.4e-2; int4 63 -> 38 ms, 479 -> 256 ms, 10.2 -> 6.5 s, error 0.64 -> 0.65 (weights dominate).
# Groups of 128 were faster for int8 (56 ms) at a larger error (8.1e-2).
ACTIVATION_GROUP = 32
# Rows (batch x tokens) one call of a program takes at most: more go in several calls, while attention still sees
# the whole prompt at once. Each program keeps buffers for the most rows it has seen; Janus-1.3B's 25 programs
# kept ~3 GB after one 620-token prompt (bench/fullsize_serve.py: peak 23.2 GB against 20.1 GB at /ready).
MAX_CALL_ROWS = 128


class PrecisionUnavailable(ValueError):
    """A precision this CPU (or this install) cannot run."""


def cpu_capabilities() -> list[str]:
    import openvino

    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_precision(precision: str) -> None:
    """Raise PrecisionUnavailable with the reason when `precision` cannot run here."""
    if precision not in PRECISIONS:
        raise PrecisionUnavailable(f"unknown CPU precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "bf16":
        return
    capabilities = cpu_capabilities()
    if "BF16" not in capabilities:
        raise PrecisionUnavailable(
            "--cpu-precision bf16 needs a CPU with bfloat16 arithmetic (Intel AMX or AVX512-BF16); this one has "
            f"{', '.join(capabilities)}. Use exact (float32), int8 or int4")


def find_llama(model) -> LlamaModel:
    """The LlamaModel inside a JanusModel, a LlamaForCausalLM or itself."""
    for path in ((), ("model",), ("language_model", "model")):
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, LlamaModel):
            return obj
    raise TypeError(f"no LlamaModel found in {type(model).__name__}")


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] float32 -> (int8 [out, in], float32 scales [out, 1]): symmetric, per output channel."""
    scale = np.abs(weight).max(axis=0) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.empty((weight.shape[1], weight.shape[0]), np.int8)
    step = 1024  # in slices, so that no float32 copy of the whole matrix is made
    for first in range(0, weight.shape[1], step):
        cols = slice(first, first + step)
        q[cols] = np.rint(weight[:, cols] / scale[cols]).T
    return q, scale[:, None]


def int4_group(width: int) -> int:
    """Inputs per int4 scale: INT4_GROUP, or for narrower or odd widths the largest power of two that divides
    them (Janus-1.3B's 2048 and 5632 both take 128; janus-tiny's smaller ones less)."""
    group = INT4_GROUP
    while width % group:
        group //= 2
    return group


def quantize_int4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] float32 -> (int8 values in [-8, 7], [out, in // group, group]; float32 scales
    [out, in // group, 1]): symmetric, one scale per `group` (int4_group) consecutive inputs of an output."""
    rows, cols = weight.shape
    group = int4_group(rows)
    q = np.empty((cols, rows // group, group), np.int8)
    scales = np.empty((cols, rows // group, 1), np.float32)
    step = 1024
    for first in range(0, cols, step):
        part = np.ascontiguousarray(weight[:, first:first + step].T).reshape(-1, rows // group, group)
        scale = np.abs(part).max(axis=2, keepdims=True) / np.float32(7)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        q[first:first + step] = np.clip(np.rint(part / scale), -8, 7)
        scales[first:first + step] = scale
    return q, scales


def dequantized(weight: np.ndarray, precision: str) -> np.ndarray:
    """The float32 [in, out] weight that `precision`'s program multiplies by (what its quantization keeps)."""
    if precision == "int8":
        q, scale = quantize_int8(weight)
        return (q.astype(np.float32) * scale).T.copy()
    if precision == "int4":
        q, scale = quantize_int4(weight)
        return (q.astype(np.float32) * scale).reshape(weight.shape[1], weight.shape[0]).T.copy()
    return weight


def _int4_constant(values: np.ndarray):
    """An OpenVINO i4 constant holding `values` (int8 in [-8, 7]): two per byte, the first in the low nibble."""
    import openvino

    tensor = openvino.Tensor(openvino.Type.i4, openvino.Shape(list(values.shape)))
    flat = values.reshape(-1).view(np.uint8)
    tensor.data[:] = ((flat[0::2] & 15) | (flat[1::2] << 4)).reshape(tensor.data.shape)
    return openvino.op.Constant(tensor)


class _GraphBuilder:
    """OpenVINO operations for the parts, with weights in the chosen precision."""

    def __init__(self, llama: LlamaModel, precision: str):
        c = llama.config
        self.llama = llama
        self.precision = precision
        self.eps = float(c.rms_norm_eps)
        self.hidden = c.hidden_size
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.keep: list[np.ndarray] = []  # memory the graph's constants point into, until it is compiled
        self.weight_bytes = 0  # what the graph's weights take in this precision: the bytes a step reads

    def weight_product(self, x, param):
        """x @ param (Paddle's Linear weight is [in, out])."""
        import openvino
        import openvino.opset13 as ops

        w = float32_view(param)
        if self.precision in ("exact", "bf16"):
            self.keep.append(w)
            # bf16: OpenVINO packs float32 constants as bfloat16 when it compiles for bf16 (a 16-product chain of
            # 2048 x 5632 weights at 2 rows: 26 ms for float32 constants compiled for f32, 17 ms compiled for bf16,
            # below float32's read floor of 24 ms; bfloat16 constants made here ran no faster and held more memory)
            self.weight_bytes += w.nbytes // 2 if self.precision == "bf16" else w.nbytes
            return ops.matmul(x, openvino.op.Constant(w, shared_memory=True), False, False)
        if self.precision == "int8":
            q, scale = quantize_int8(w)
            self.weight_bytes += q.nbytes + scale.nbytes
            weight = ops.multiply(ops.convert(openvino.op.Constant(q), np.float32), ops.constant(scale))
        else:
            q, scale = quantize_int4(w)
            self.weight_bytes += q.size // 2 + scale.nbytes
            weight = ops.multiply(ops.convert(_int4_constant(q), np.float32), ops.constant(scale))
            weight = ops.reshape(weight, ops.constant(np.array([w.shape[1], w.shape[0]], np.int64)), False)
        return ops.matmul(x, weight, False, True)

    def rms_norm(self, x, param):
        import openvino.opset13 as ops

        mean = ops.reduce_mean(ops.multiply(x, x), ops.constant(np.array([-1], np.int64)), True)
        normed = ops.divide(x, ops.sqrt(ops.add(mean, ops.constant(np.float32(self.eps)))))
        weight = float32_view(param)
        self.weight_bytes += weight.nbytes
        return ops.multiply(normed, ops.constant(weight))  # ops.constant copies

    def start(self, x, layer: int, cos, sin):
        """Input norm, qkv and rotary of `layer`: (qk [N, heads + kv_heads, D], v [N, kv_heads, D])."""
        import openvino.opset13 as ops

        block = self.llama.layers[layer]
        d, heads, kv = self.head_dim, self.heads, self.kv_heads
        qkv = self.weight_product(self.rms_norm(x, block.input_layernorm.weight), block.self_attn.qkv_proj.weight)
        qk, v = ops.variadic_split(qkv, ops.constant(np.int64(-1)),
                                   ops.constant(np.array([(heads + kv) * d, kv * d], np.int64))).outputs()
        qk = ops.reshape(qk, ops.constant(np.array([-1, heads + kv, d], np.int64)), False)
        first, second = ops.split(qk, ops.constant(np.int64(-1)), 2).outputs()
        rotated = ops.concat([ops.negative(second), first], -1)
        qk = ops.add(ops.multiply(qk, cos), ops.multiply(rotated, sin))
        return qk, ops.reshape(v, ops.constant(np.array([-1, kv, d], np.int64)), False)

    def finish(self, attn, res, layer: int):
        """o_proj + residual, then the MLP block + residual, of `layer`."""
        import openvino.opset13 as ops

        block = self.llama.layers[layer]
        h = ops.add(res, self.weight_product(attn, block.self_attn.o_proj.weight))
        gate_up = self.weight_product(self.rms_norm(h, block.post_attention_layernorm.weight),
                                      block.mlp.gate_up_proj.weight)
        gate, up = ops.split(gate_up, ops.constant(np.int64(-1)), 2).outputs()
        return ops.add(h, self.weight_product(ops.multiply(ops.swish(gate), up), block.mlp.down_proj.weight))

    def part(self, before: int | None, after: int | None):
        """The program between the attention of layer `before` and that of layer `after` (None: the ends)."""
        import openvino
        import openvino.opset13 as ops

        d = self.head_dim
        cos = ops.parameter([-1, 1, d], np.float32, name="cos")
        sin = ops.parameter([-1, 1, d], np.float32, name="sin")
        if before is None:
            x = ops.parameter([-1, self.hidden], np.float32, name="x")
            qk, v = self.start(x, after, cos, sin)
            return openvino.Model([qk, v], [x, cos, sin], "janus_layer_start")
        attn = ops.parameter([-1, self.heads * d], np.float32, name="attn")
        res = ops.parameter([-1, self.hidden], np.float32, name="res")
        h = self.finish(attn, res, before)
        if after is None:
            out = self.rms_norm(h, self.llama.norm.weight)
            return openvino.Model([out], [attn, res], "janus_layer_last")
        qk, v = self.start(h, after, cos, sin)
        return openvino.Model([h, qk, v], [attn, res, cos, sin], f"janus_layer_{after}")


@dataclasses.dataclass
class _Plan:
    cos: np.ndarray  # [N, 1, D]
    sin: np.ndarray
    write: tuple[np.ndarray, np.ndarray, np.ndarray]  # block, slot, offset [N]
    groups: list[Group] | None  # None: a prompt from position 0 attends over itself
    batch: int
    length: int


class CpuDecoder:
    """`forward_hidden` of the LLaMA stack through OpenVINO programs, on the eager model's KV cache.

    decoder = CpuDecoder(model, precision="exact")
    hidden = decoder.forward_hidden(embeds, cache, slots, start)
        the contract of model.forward_hidden: embeds [B, T, H] (Paddle tensor or numpy),
        slots/start [B] ints; returns the final-normed float32 hidden [B, T, H] as a Paddle
        tensor and writes the new keys/values into `cache` in place.

    `threads`: OpenVINO's threads (default: every core the process is meant to use).
    `release_eager`: free the eager layer weights once compiled (see the module's doc).
    `store`: a ProgramStore (model/cpu_programs.py) to import the programs from, or to save them into
    once built; with its entry complete, the layers' eager weights may be left unloaded.
    `quantize_activations` (int8, int4): False keeps the activations float32 (the tests check the
    weights' path alone so). Not thread-safe: one caller at a time.
    """

    def __init__(self, model, *, precision: str = "exact", threads: int | None = None, release_eager: bool = False,
                 store: ProgramStore | None = None, quantize_activations: bool = True):
        import openvino

        from .cpu_engine import cpu_threads

        check_precision(precision)
        self.llama = llama = find_llama(model)
        c = llama.config
        if llama.norm.weight.dtype != paddle.float32:
            raise ValueError("CpuDecoder builds from a float32 model; this one is " + str(llama.norm.weight.dtype))
        self.precision = precision
        self.quantized_activations = quantize_activations and precision in ("int8", "int4")
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.hidden = c.hidden_size
        self.scale = np.float32(1.0 / np.sqrt(self.head_dim))
        self.inv_freq = llama.inv_freq
        self.threads = threads or cpu_threads()
        self.cache: KVCache | None = None
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                  "ENABLE_CPU_PINNING": False,
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": ACTIVATION_GROUP if self.quantized_activations else 0}
        core = openvino.Core()
        layers = len(llama.layers)
        bounds = [(None, 0)] + [(i, i + 1) for i in range(layers - 1)] + [(layers - 1, None)]
        params = [p for b in bounds for p in self._params(*b)]
        self.weight_bytes = 0  # of the programs' weights, in this precision: what a step reads
        self.released_bytes = 0
        self.store = None  # the ProgramStore its programs were imported from (it keeps their blobs mapped)
        programs = []
        if store is not None and store.complete():
            try:
                programs, manifest = store.load(core, config, len(bounds))
                self.weight_bytes = manifest["weight_bytes"]
                self.store = store
            except ProgramStoreError as error:  # store.load discarded the entry
                if not all(p._is_initialized() for p in params):
                    raise  # the loader skipped the weights for this entry: the caller loads them and asks again
                log.warning("compiled decoder programs in %s not used (%s); building them", store.path, error)
        self._file = None  # the store whose saved file the programs run from, when built now and imported at once
        if self.store is None:
            programs, shared = self._build(core, config, bounds)
            probes = snapshot(programs) if release_eager or store is not None else []
            if store is not None and store.save([request.get_compiled_model() for request in programs], probes,
                                                {"weight_bytes": self.weight_bytes}):
                # Run as imported from the saved file, as the next start will: the imported constants are pages of
                # the file, so nothing reads the eager weights and they are freed outright, with no page drop
                # (model/cpu_memory.py). The built programs go first, so that two compiled copies never coexist.
                del programs
                try:
                    programs, _ = store.load(core, config, len(bounds))  # checked against the built ones' probes
                    self._file, shared = store, []
                except ProgramStoreError as error:
                    log.warning("decoder programs saved in %s could not be imported (%s); building them again",
                                store.path, error)
                    programs, shared = self._build(core, config, bounds)
            if release_eager and self._file is not None:
                self.released_bytes = sum(int(p.numel()) * p.element_size() for p in params)
                for param in params:
                    param._clear_data()
                trim_heap()
            elif release_eager:  # only once all are built, so that a failed build leaves the eager model whole
                self.released_bytes = self._release(programs, params, shared, probes)
        elif release_eager:
            for param in params:
                param._clear_data()
        self.requests = programs

    def _build(self, core, config: dict, bounds: list) -> tuple[list, list[np.ndarray]]:
        """Compile the programs from the eager weights: (infer requests, the eager memory their constants were
        made from: exact and bf16 share it)."""
        programs, shared = [], []
        self.weight_bytes = 0
        for part in bounds:
            builder = _GraphBuilder(self.llama, self.precision)
            programs.append(core.compile_model(builder.part(*part), "CPU", config).create_infer_request())
            shared += builder.keep
            self.weight_bytes += builder.weight_bytes
        return programs, shared

    def warm_up(self, rows: int | None = None) -> None:
        """Run every program once on `rows` rows (default MAX_CALL_ROWS, the most one call takes). Each keeps
        buffers for the most rows it has seen: made now, they are in the memory a worker measures before it sizes
        its KV cache, and the first long prompt does not wait for them. Janus-1.3B, 2-core AVX-512 EPYC: a
        695-token prefill took 12.4 s the first time, 10.3 s after."""
        from .cpu_memory import probe_inputs

        for request in self.requests:
            request.infer(probe_inputs(request, rows or MAX_CALL_ROWS))

    @staticmethod
    def _release(programs: list, params: list, shared: list[np.ndarray], before: list[np.ndarray]) -> int:
        """Free the eager weights the programs were built from (model/cpu_memory.py); the bytes given back.
        Raises if a program's outputs change from `before` (snapshot): it read the memory given back."""
        from .cpu_memory import drop_pages, same_outputs, trim_heap

        dropped = drop_pages(shared)  # held by the programs' constants: cannot be freed, only given back
        for param in params:
            param._clear_data()
        trim_heap()
        if not same_outputs(programs, before):
            raise RuntimeError("an OpenVINO decoder program read the eager weights after they were released")
        return dropped

    def _params(self, before: int | None, after: int | None) -> list:
        llama, params = self.llama, []
        if before is not None:
            block = llama.layers[before]
            params += [block.self_attn.o_proj.weight, block.post_attention_layernorm.weight,
                       block.mlp.gate_up_proj.weight, block.mlp.down_proj.weight]
        if after is not None:
            block = llama.layers[after]
            params += [block.input_layernorm.weight, block.self_attn.qkv_proj.weight]
        else:
            params.append(llama.norm.weight)
        return params

    @property
    def imported(self) -> bool:
        """Whether its programs were imported from an earlier start's (`store`)."""
        return self.store is not None

    def describe(self) -> dict:
        return {"decoder": "openvino", "precision": self.precision, "quantized_activations": self.quantized_activations,
                "threads": self.threads, "programs": len(self.requests)}

    # ---- the cache

    def _use_cache(self, cache: KVCache) -> None:
        # Views are made once per cache; a swapped tensor inside it would leave them stale.
        if cache is self.cache and all(a is b for a, b in zip(cache.k + cache.v, self._sources)):
            return
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if cache.k[0].dtype != paddle.float32:
            raise ValueError("CpuDecoder needs a float32 KV cache")
        if len(cache.k) != len(self.llama.layers):
            raise ValueError(f"the cache has {len(cache.k)} layers, the model {len(self.llama.layers)}")
        self._k = [np.from_dlpack(t) for t in cache.k]  # zero-copy: writes land in the Paddle tensors
        self._v = [np.from_dlpack(t) for t in cache.v]
        for view in self._k + self._v:
            if view.ndim != 5 or view.shape[2] != self.kv_heads or view.shape[4] != self.head_dim:
                raise ValueError(f"cache layout {list(view.shape)} does not fit {self.kv_heads} kv heads x {self.head_dim}")
            if not view.flags.writeable:
                raise RuntimeError("the KV cache view is read-only")
        self.cache, self._sources = cache, list(cache.k + cache.v)

    def plan(self, cache: KVCache, slots, start, batch: int, length: int) -> _Plan:
        slots, start, positions = cache_addresses(cache, slots, start, batch, length)  # positions [B, T]
        cos, sin = rotary_cos_sin(positions.reshape(-1), self.inv_freq)
        bs = cache.block_size
        fresh = length > 1 and not start.any()
        return _Plan(cos=np.ascontiguousarray(cos[:, None, :]), sin=np.ascontiguousarray(sin[:, None, :]),
                     write=((positions // bs).reshape(-1), np.repeat(slots, length), (positions % bs).reshape(-1)),
                     groups=None if fresh else plan_groups(slots, positions, bs), batch=batch, length=length)

    # ---- running

    def forward_hidden(self, embeds, cache: KVCache, slots, start) -> paddle.Tensor:
        x = embeds.numpy() if isinstance(embeds, paddle.Tensor) else np.asarray(embeds)
        if x.ndim != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"embeds must be [batch, tokens, {self.hidden}], got shape {list(x.shape)}")
        batch, length, _ = x.shape
        self._use_cache(cache)
        plan = self.plan(cache, slots, start, batch, length)
        hidden = self.run(np.ascontiguousarray(x.reshape(batch * length, self.hidden), dtype=np.float32), plan)
        return from_numpy(hidden.reshape(batch, length, self.hidden))

    def _attend(self, layer: int, qk: np.ndarray, v: np.ndarray, plan: _Plan) -> np.ndarray:
        """Write this call's keys/values into the cache, then attend; [N, heads * D]."""
        heads, kv_heads = self.heads, self.kv_heads
        kc, vc = self._k[layer], self._v[layer]
        write_cache(kc, vc, plan.write, qk[:, heads:], v)
        if plan.groups is None:
            shape = (plan.batch, plan.length)
            out = prompt_attention(qk[:, :heads].reshape(*shape, heads, -1), qk[:, heads:].reshape(*shape, kv_heads, -1),
                                   v.reshape(*shape, kv_heads, -1), scale=self.scale, causal=True)
            return out.reshape(plan.batch * plan.length, -1)
        return attend(qk[:, :heads], kc, vc, plan.groups, kv_heads=kv_heads, length=plan.length, scale=self.scale)

    def run(self, x: np.ndarray, plan: _Plan) -> np.ndarray:
        """Rows x [B*T, H] float32 (batch-major) -> final-normed hidden [B*T, H], on the bound cache."""
        rows = x.shape[0]
        qk, v = self._infer(0, (x, plan.cos, plan.sin), rows)
        res = x
        last = len(self.requests) - 1
        for layer in range(last):
            attn = self._attend(layer, qk, v, plan)
            if layer + 1 < last:
                res, qk, v = self._infer(layer + 1, (attn, res, plan.cos, plan.sin), rows)
            else:
                (res,) = self._infer(layer + 1, (attn, res), rows)
        return res.copy()  # the last program's output buffer is reused by its next call

    def _infer(self, index: int, inputs: tuple, rows: int) -> list[np.ndarray]:
        """Program `index` on `inputs` (each [rows, ...]): its outputs, views of its buffers up to MAX_CALL_ROWS
        rows, else copies made in calls of MAX_CALL_ROWS rows (every program works row by row)."""
        request = self.requests[index]
        count = len(request.model_outputs)
        if rows > MAX_CALL_ROWS:
            pieces = []
            for first in range(0, rows, MAX_CALL_ROWS):
                part = {i: array[first:first + MAX_CALL_ROWS] for i, array in enumerate(inputs)}
                request.infer(part, share_inputs=True, share_outputs=True)
                pieces.append([request.get_output_tensor(i).data.copy() for i in range(count)])
            return [np.concatenate([piece[i] for piece in pieces]) for i in range(count)]
        request.infer(dict(enumerate(inputs)), share_inputs=True, share_outputs=True)
        outs = [request.get_output_tensor(i).data for i in range(count)]
        if any(o.shape[0] != rows for o in outs):
            raise RuntimeError(f"program {index} gave {[list(o.shape) for o in outs]} for {rows} rows")
        return outs
