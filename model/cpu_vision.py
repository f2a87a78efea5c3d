"""CPU image encoder for understanding: SigLIP + aligner as one OpenVINO model, float32.

Why: the eager encoder is some hundred Paddle ops per image, each dispatched from Python
under the GIL. In the worker's prefill thread (server/engine/worker.py) that Python time
is taken from the decode loop, which needs the GIL for its own ops. OpenVINO runs the
whole encoder in one infer() call that releases the GIL, and it is faster. Measured on the
2-core dev box (bench/vision_bench.py, one 384 x 384 image, eager / OpenVINO on 2 threads /
on 1): janus-tiny 12.9 / 2.6 / 4.8 ms; Janus-1.3B's SigLIP-L (random weights) 4.6 / 2.6 /
5.0 s (eager was 10.2 s before llama.linear sent its projections to numpy's BLAS).

The graph is built with OpenVINO's own operations on the eager model's parameters
(zero-copy views; OpenVINO repacks what it needs when compiling), following model/siglip.py and janus.MlpProjector step by step: patch
convolution, position embeddings, pre-norm blocks (LayerNorm, attention, LayerNorm,
exact-erf GELU MLP), final LayerNorm, then the aligner (Linear, GELU, Linear, ...).
Not via Paddle's program export: Paddle 3.3's F.gelu has no old-IR form, and the
openvino package reads only old-IR programs. float32 inference precision is pinned
(OpenVINO would otherwise pick bf16 on CPUs that have it); features match eager to
~1e-5.

    encoder = CpuVisionEncoder(model)        # model: JanusModel, float32 on CPU
    features = encoder.encode(pixels)        # [N, 3, 384, 384] float32 -> [N, 576, hidden] numpy
    features = encoder.encode_images(pixels) # the same as a Paddle tensor, = model.encode_images(pixels)
"""
from __future__ import annotations

import time

import numpy as np
import paddle

from .cpu_engine import CompiledCopies, EngineUnavailable, cpu_threads, openvino_runtime_available
from .tensors import float32_view, from_numpy


# The JanusModel parameters the program holds (by name prefix): what the loader need not read when it is imported
# from a ProgramStore (model/cpu_programs.py).
HELD_PARAMETERS = ("vision_model.", "aligner.")


class CpuVisionEncoder:
    """SigLIP + aligner of a float32 JanusModel, compiled by OpenVINO for the CPU.

    `threads`: OpenVINO's threads for one encode (default: every core the process is meant
    to use). `single_thread_copy=True` also compiles a one-thread copy (its own copy of the
    weights) for encode(..., single_thread=True), for when decode steps run on the other
    cores, as CpuVQDecoder does. encode() is not re-entrant: one caller at a time.
    """

    def __init__(self, model, *, threads: int | None = None, single_thread_copy: bool = False,
                 release_eager: bool = False, store=None):
        """`release_eager`: free the eager encoder's and aligner's weights once compiled (OpenVINO holds its own
        copy; model.encode_images then fails: the caller runs this encoder instead). `store`: a ProgramStore
        to import the program from, or to save it into (CompiledCopies); imported, the eager weights may be
        left unloaded (HELD_PARAMETERS)."""
        if not openvino_runtime_available():
            raise EngineUnavailable("the openvino package is not installed")
        vision, aligner = model.vision_model, model.aligner
        if vision.pos_embed.dtype != paddle.float32:
            raise ValueError("CpuVisionEncoder is float32 only; the model is " + str(vision.pos_embed.dtype))
        started = time.perf_counter()
        self.config = vision.config
        self.threads = threads or cpu_threads()
        self._shared: list[np.ndarray] = []  # the eager memory the graph's constants point into
        self.program = CompiledCopies(lambda: self._graph(vision, aligner, None if release_eager else self._shared),
                                      self.threads, single_thread_copy, store,
                                      weights_loaded=vision.pos_embed._is_initialized())
        self.hidden = int(self.program.compiled[self.threads].output(0).get_partial_shape()[2].get_length())
        if release_eager:  # the program's constants are copies: the eager weights can go
            from .cpu_memory import trim_heap

            for param in [*vision.parameters(), *aligner.parameters()]:
                param._clear_data()
            trim_heap()
        self.build_seconds = time.perf_counter() - started

    @staticmethod
    def _graph(vision, aligner, shared: list):
        import openvino
        import openvino.opset13 as ops

        config = vision.config
        size, patch, width, heads = config.image_size, config.patch_size, config.width, config.heads
        head_dim = width // heads
        tokens = (size // patch) ** 2

        def const(value):
            # Shared with the eager model (`shared` is a list), not copied: OpenVINO reads these where they are.
            # Copied when the eager weights are to be freed (`shared` None).
            if isinstance(value, np.ndarray) and value.size > 1 and shared is not None:
                shared.append(value)
                return openvino.op.Constant(value, shared_memory=True)
            return ops.constant(np.array(value, np.float32))

        def shape(*dims):
            return ops.constant(np.array(dims, np.int64))

        def linear(x, layer):  # Paddle's Linear weight is [in, out]
            y = ops.matmul(x, const(float32_view(layer.weight)), False, False)
            return ops.add(y, const(float32_view(layer.bias))) if layer.bias is not None else y

        def layer_norm(x, norm):
            axis = ops.constant(np.array([-1], np.int64))
            normed = ops.mvn(x, axis, True, float(norm._epsilon), "inside_sqrt")
            return ops.add(ops.multiply(normed, const(float32_view(norm.weight))), const(float32_view(norm.bias)))

        def gelu(x):
            return ops.gelu(x, "erf")

        pixels = ops.parameter([-1, 3, size, size], np.float32, name="pixels")
        conv = vision.patch_embed.proj
        x = ops.convolution(pixels, const(float32_view(conv.weight)), [patch, patch], [0, 0], [0, 0], [1, 1])
        x = ops.add(x, const(float32_view(conv.bias).reshape(1, width, 1, 1)))
        x = ops.transpose(ops.reshape(x, shape(0, width, tokens), True), shape(0, 2, 1))  # [N, tokens, width]
        x = ops.add(x, const(float32_view(vision.pos_embed)))
        scale = const(np.float32(head_dim ** -0.5))
        for block in vision.blocks:
            h = linear(layer_norm(x, block.norm1), block.attn.qkv)  # [N, T, 3 * width]
            h = ops.transpose(ops.reshape(h, shape(0, tokens, 3, heads, head_dim), True), shape(2, 0, 3, 1, 4))
            q, k, v = (ops.squeeze(part, ops.constant(np.array([0], np.int64)))
                       for part in ops.split(h, ops.constant(np.int64(0)), 3).outputs())
            scores = ops.matmul(ops.multiply(q, scale), k, False, True)  # [N, heads, T, T]
            out = ops.matmul(ops.softmax(scores, -1), v, False, False)  # [N, heads, T, D]
            out = ops.reshape(ops.transpose(out, shape(0, 2, 1, 3)), shape(0, tokens, width), True)
            x = ops.add(x, linear(out, block.attn.proj))
            mlp = block.mlp
            x = ops.add(x, linear(gelu(linear(layer_norm(x, block.norm2), mlp.fc1)), mlp.fc2))
        x = layer_norm(x, vision.norm)
        for layer in aligner.layers:
            x = gelu(x) if isinstance(layer, paddle.nn.GELU) else linear(x, layer)
        return openvino.Model([x], [pixels], "janus_vision")

    @property
    def imported(self) -> bool:
        """Whether its program was imported from an earlier start's (CompiledCopies)."""
        return self.program.imported

    def warm_up(self) -> None:
        """One encode of a blank image on every copy. An imported program packs part of its weights on its first
        run, reading them from its file (CompiledCopies.infer); at Janus-1.3B's sizes the first understanding
        request after a start took 14.7 s to its first token, the next ones 12.0 s."""
        pixels = np.zeros((1, 3, self.config.image_size, self.config.image_size), np.float32)
        for single_thread in sorted({False, 1 in self.program.requests}):
            self.encode(pixels, single_thread=single_thread)

    def encode(self, pixel_values, *, single_thread: bool = False) -> np.ndarray:
        """[N, 3, size, size] pixels in [-1, 1] -> [N, tokens, hidden] float32 features.

        `single_thread`: use the one-thread copy (if built), leaving the other cores to the decode loop."""
        pixels = np.ascontiguousarray(pixel_values.numpy() if isinstance(pixel_values, paddle.Tensor)
                                      else pixel_values, dtype=np.float32)
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be [N, 3, {size}, {size}], got shape {list(pixels.shape)}")
        features = np.array(self.program.infer({0: pixels}, single_thread=single_thread)[0], dtype=np.float32,
                            copy=True)
        tokens = self.config.num_patches
        if features.shape != (pixels.shape[0], tokens, self.hidden):
            raise RuntimeError(f"vision encoder output {list(features.shape)} for {pixels.shape[0]} images")
        return features

    def encode_images(self, pixel_values, *, single_thread: bool = False) -> paddle.Tensor:
        """model.encode_images through this encoder (for DecodeBatch's `encode_images`)."""
        return from_numpy(self.encode(pixel_values, single_thread=single_thread))
