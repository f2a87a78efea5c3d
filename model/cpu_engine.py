"""The OpenVINO programs of the image side on CPU: the VQ decoder (CpuVQDecoder), exported as a Paddle program
and read by the `openvino` package, and CompiledCopies, the compilations it and model/cpu_vision.py run.
The language model's layers are model/cpu_decoder.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import paddle
import paddle.nn as nn

from .tensors import from_numpy

log = logging.getLogger(__name__)

class EngineUnavailable(RuntimeError):
    """An OpenVINO program cannot be built here (the openvino package is not installed)."""


def cpu_threads() -> int:
    """The CPU threads this process is meant to use: OMP_NUM_THREADS (the worker sets it), else every core."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def _export(part: nn.Layer, spec, path: str) -> str:
    """Save `part` as a static program at path(.pdmodel/.pdiparams); returns path.

    The old program format: the openvino package's Paddle frontend cannot read PIR's .json.
    """
    with paddle.pir_utils.DygraphOldIrGuard():
        static = paddle.jit.to_static(part, input_spec=spec, full_graph=True)
        paddle.jit.save(static, path, input_spec=spec)
    return path


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

    `graph`: the OpenVINO model, or a function that makes it. `store`: a ProgramStore
    (model/cpu_programs.py) to import the compilations from, without calling `graph`, or to save them
    into once compiled (checked by their digests: a probe of Janus-1.3B's image encoder or VQ decoder
    takes seconds). `weights_loaded`: whether `graph` can still be made when the store's entry turns out
    unusable; if not, its ProgramStoreError is raised (the caller loads the weights and asks again).
    `self.store` is the store whose file the programs run from (imported now or at an earlier start), or None;
    `self.imported`: whether an earlier start saved them.
    """

    def __init__(self, graph, threads: int, single_thread_copy: bool, store=None, weights_loaded: bool = True):
        import openvino

        from .cpu_programs import ProgramStoreError

        core = openvino.Core()
        self.threads = threads
        counts = sorted({threads, 1} if single_thread_copy else {threads})
        configs = [{"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": n,
                    "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False} for n in counts]
        self.store, self.imported, requests = None, False, None
        if store is not None and store.complete():
            try:
                requests, _ = store.load(core, configs, len(counts))
                self.store, self.imported = store, True
            except ProgramStoreError as error:  # store.load discarded the entry
                if not weights_loaded:
                    raise
                log.warning("compiled programs in %s not used (%s); building them", store.path, error)
        if requests is None:
            model = graph() if callable(graph) else graph
            compiled = [core.compile_model(model, "CPU", config) for config in configs]
            del model
            if store is not None and store.save(compiled, None):
                # Run as imported from the saved file: a compiled program keeps its original constants beside
                # the packed copy (Janus-1.3B's image encoder: 2.4 GB for 1.2 GB of weights), an imported
                # one keeps them as pages of the file, given back.
                try:
                    requests, _ = store.load(core, configs, len(counts))
                    self.store = store
                except ProgramStoreError as error:
                    log.warning("compiled programs in %s could not be imported (%s)", store.path, error)
            if requests is None:
                requests = [program.create_infer_request() for program in compiled]
            del compiled
        self.requests = dict(zip(counts, requests))
        self.compiled = {n: request.get_compiled_model() for n, request in self.requests.items()}
        self._ran: list = []  # the requests that have run once (infer)

    def infer(self, inputs: dict, *, single_thread: bool = False):
        """The outputs of one run, on the one-thread copy if `single_thread` and it was built.

        An imported program reads part of its blob again on its first run (OpenVINO packs some weights
        then): Janus-1.3B's image encoder and VQ decoder brought 0.56 GB of the file's pages back. Those
        are given back after that run (ProgramStore.release_pages)."""
        request = self.requests[1] if single_thread and 1 in self.requests else self.requests[self.threads]
        outputs = request.infer(inputs)
        if self.store is not None and request not in self._ran:
            self._ran.append(request)
            self.store.release_pages()
        return outputs


def openvino_runtime_available() -> bool:
    """The `openvino` Python package (its infer() releases the GIL, unlike Paddle Inference's run())."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


# The JanusModel parameters CpuVQDecoder's program holds (by name prefix; the codebook lookup stays eager): what the
# loader need not read when it is imported from a ProgramStore (model/cpu_programs.py).
VQ_HELD_PARAMETERS = ("gen_vision_model.post_quant_conv.", "gen_vision_model.decoder.")


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
    for decode(..., single_thread=True). The worker no longer uses it: at Janus-1.3B's sizes a VQ
    decode on every core beside 8-row steps took 0.874x the wall time of the two one after the
    other, on one core 0.924x (bench/cpu_bench.py --vq-overlap, which keeps the copy to compare).
    """

    def __init__(self, model, *, threads: int | None = None, workdir: str | None = None,
                 image_tokens: int = 576, single_thread_copy: bool = False, layout_free_norms: bool = True,
                 store=None):
        """`store`: a ProgramStore to import the program from, or to save it into (CompiledCopies); imported, the
        decoder's eager weights may be left unloaded (VQ_HELD_PARAMETERS)."""
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
        def graph():
            part = _VQPart(self.vq, self.side)
            with _layout_free_group_norms(part) if layout_free_norms else contextlib.nullcontext():
                path = _export(part, part.input_spec("vq"), os.path.join(root, "vq"))
            return openvino.Core().read_model(path + ".pdmodel")

        try:
            self.program = CompiledCopies(graph, self.threads, single_thread_copy, store,
                                          weights_loaded=self.vq.post_quant_conv.weight._is_initialized())
        finally:
            shutil.rmtree(root, ignore_errors=True)  # compiled: the weights live in OpenVINO now
        self.build_seconds = time.perf_counter() - started

    @property
    def imported(self) -> bool:
        """Whether its program was imported from an earlier start's (CompiledCopies)."""
        return self.program.imported

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
