"""The output heads on CPU as OpenVINO programs, float32: lm_head (text logits) and gen_head (image logits).

Why: beside the OpenVINO decoder numpy's BLAS keeps to one thread (runtime/cpu.one_blas_thread), so
the eager heads read their weights on one core. At Janus-1.3B's sizes (2-core AVX-512 EPYC) a text
token's lm_head (0.84 GB) took 42.5 ms, an image step's gen_head 16.7 ms at 2 rows and 37.3 ms at 8;
as programs on every core 28.0, 5.3 and 5.7 ms, equal to eager within ~1e-6. They stay float32 in
every --cpu-precision: the lossy modes' errors are the decoder's alone.

Only through a ProgramStore (model/cpu_programs.py). A program compiled from the eager weights may
read them again on its first call at a row count it has not seen (OpenVINO repacks a weight for a
new kernel from the original constant: janus-tiny's image head did from 7 rows on), so the eager copy
could not be freed, nor its pages given back (model/cpu_memory.py). So the programs are compiled,
saved, and run as imported from the saved file: their constants are then pages of that file, which
can be given back and read again. Without a store (off, or not writable) the heads stay eager.

    heads = CpuHeads(model, store)                 # raises EngineUnavailable without a usable store
    logits = heads.text_logits(hidden)             # = model.text_logits(hidden): [..., H] -> [..., vocab]
    logits = heads.image_logits(hidden)            # = model.image_logits(hidden)
"""
from __future__ import annotations

import numpy as np
import paddle

from .cpu_engine import EngineUnavailable, cpu_threads
from .cpu_memory import snapshot, trim_heap
from .cpu_programs import ProgramStoreError
from .tensors import float32_view, from_numpy

# The JanusModel parameters the programs hold (by name prefix): what the loader need not read when they are
# imported from a ProgramStore.
HELD_PARAMETERS = ("language_model.lm_head.", "gen_head.")


def _graphs(model) -> list:
    """[text head, image head] as OpenVINO models, their constants sharing the eager weights' memory."""
    import openvino
    import openvino.opset13 as ops

    def linear(x, layer):  # Paddle's Linear weight is [in, out]
        y = ops.matmul(x, openvino.op.Constant(float32_view(layer.weight), shared_memory=True), False, False)
        return ops.add(y, ops.constant(float32_view(layer.bias))) if layer.bias is not None else y

    hidden = model.config.language.hidden_size
    text_in = ops.parameter([-1, hidden], np.float32, name="hidden")
    text = openvino.Model([linear(text_in, model.language_model.lm_head)], [text_in], "janus_text_head")
    head = model.gen_head
    image_in = ops.parameter([-1, hidden], np.float32, name="hidden")
    image = linear(ops.gelu(linear(image_in, head.output_mlp_projector), "erf"), head.vision_head)
    return [text, openvino.Model([image], [image_in], "janus_image_head")]


class CpuHeads:
    """model.text_logits and model.image_logits as OpenVINO programs imported from `store`.

    The first start compiles them from the eager weights and saves them in `store`; every start then
    imports them from there and frees the eager heads (`release_eager`). `self.imported`: whether an
    earlier start saved them. Not thread-safe.
    """

    def __init__(self, model, store, *, threads: int | None = None, release_eager: bool = True):
        import openvino

        if store is None:
            raise EngineUnavailable("the heads run as OpenVINO programs only from a program store")
        params = self._params(model)
        if params[0].dtype != paddle.float32:
            raise ValueError("CpuHeads builds from a float32 model; this one is " + str(params[0].dtype))
        self.hidden = model.config.language.hidden_size
        self.threads = threads or cpu_threads()
        core = openvino.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads,
                  "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        loaded = all(p._is_initialized() for p in params)
        earlier = store.complete()
        if not earlier:
            if not loaded:
                raise ProgramStoreError("the heads' weights were not loaded and no programs are saved")
            requests = [core.compile_model(graph, "CPU", config).create_infer_request() for graph in _graphs(model)]
            store.save([request.get_compiled_model() for request in requests], snapshot(requests))
            del requests
            if not store.complete():  # store.save logged why
                raise EngineUnavailable("the heads' programs could not be saved; the heads stay eager")
        try:
            self.requests, _ = store.load(core, config, 2)
        except ProgramStoreError as error:
            if loaded:  # the eager heads can serve
                raise EngineUnavailable(f"the heads' saved programs could not be imported ({error})") from error
            raise  # their weights were not loaded: the caller loads them and asks again
        self.imported = earlier  # saved by an earlier start
        self._store = store  # keeps the blobs mapped
        if release_eager:
            for param in params:
                param._clear_data()
            trim_heap()

    @staticmethod
    def _params(model) -> list:
        head = model.gen_head
        return [model.language_model.lm_head.weight, head.output_mlp_projector.weight, head.output_mlp_projector.bias,
                head.vision_head.weight, head.vision_head.bias]

    def _run(self, index: int, hidden) -> paddle.Tensor:
        x = hidden.numpy() if isinstance(hidden, paddle.Tensor) else np.asarray(hidden)
        lead = x.shape[:-1]
        if x.shape[-1] != self.hidden:
            raise ValueError(f"hidden states must be [..., {self.hidden}], got shape {list(x.shape)}")
        rows = np.ascontiguousarray(x.reshape(-1, self.hidden), dtype=np.float32)
        request = self.requests[index]
        if not len(rows):
            width = request.model_outputs[0].get_partial_shape()[1].get_length()
            return from_numpy(np.zeros((*lead, width), np.float32))
        out = request.infer({0: rows})[0]
        return from_numpy(out.reshape(*lead, out.shape[-1]))

    def text_logits(self, hidden) -> paddle.Tensor:
        return self._run(0, hidden)

    def image_logits(self, hidden) -> paddle.Tensor:
        return self._run(1, hidden)
