"""The static decode step (model/static_step.py) replayed from CUDA graphs, where the device has them.

One graph per (row bucket, cached-length bucket), all drawing on one memory pool. A graph is captured
after warm-up steps and a synchronize, with its input (the step's embeddings) in a buffer of its own
that each step refills in place; the index buffer is StaticStep's, kept per row bucket and refilled in
place too, and the output is the tensor the capture made, overwritten by each replay. Before a graph
serves it is replayed against the eager step on the same inputs; on any error during capture (the
capture is always ended, so that the stream does not stay capturing) or a mismatch it logs why and
that bucket runs eagerly. Where CUDA graphs are not available (is_cuda_graph_supported() is False on
CPU builds, and on a CPU place) capture is skipped and the same wrapper runs the eager step.

Known hazards, and how they are kept out: host syncs inside the step (the step reads nothing back),
pageable host-to-device copies during capture (the index copy happens before replay, outside the
graph), launch configurations that change between steps (a graph per bucket: shapes fixed), buffers
resized after capture (every buffer is made once per bucket and only refilled).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import paddle

from .tensors import from_numpy

log = logging.getLogger("janus.runtime")

WARMUPS = 2
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}  # relative to the output's largest value


def relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference of `got` from `want`, relative to want's largest value."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-6))


def synchronize() -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU place)."""
    if not paddle.get_device().startswith("cpu"):
        paddle.device.synchronize()


def graphs_available(device: str) -> bool:
    from paddle.device.cuda import graphs

    return graphs.is_cuda_graph_supported() and device.startswith("gpu")


class CudaGraph:
    """paddle.device.cuda.graphs.CUDAGraph on `device`, in memory pool `pool`."""

    def __init__(self, device: str, pool):
        from paddle.device.cuda import graphs

        self.graph = graphs.CUDAGraph(place=paddle.CUDAPlace(int(device.split(":")[1])), mode="thread_local",
                                      pool_id=pool)

    def capture_begin(self):
        self.graph.capture_begin()

    def capture_end(self):
        self.graph.capture_end()

    def replay(self):
        self.graph.replay()

    @staticmethod
    def new_pool():
        from paddle.base.core import CUDAGraph as Core

        return Core.gen_new_memory_pool_id()


@dataclasses.dataclass
class Captured:
    graph: Any
    x: paddle.Tensor  # the embeddings the graph reads, refilled by each step
    out: paddle.Tensor  # what the graph writes


class CapturedSteps:
    """Runs StaticStep.step (call it as that: x, cache, index, length) from a graph per bucket where it can."""

    def __init__(self, static, device: str, *, available: bool | None = None, graph_class=CudaGraph):
        self.static, self.device = static, device
        self.available = graphs_available(device) if available is None else available
        self.graph_class = graph_class
        self.pool = graph_class.new_pool() if self.available else None
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.refused: dict[tuple[int, int], str] = {}  # bucket -> why it runs eagerly

    def __call__(self, x: paddle.Tensor, cache, index: paddle.Tensor, length: int) -> paddle.Tensor:
        key = (x.shape[0], length)
        if not self.available or key in self.refused:
            return self.static.step(x, cache, index, length)
        captured = self.graphs.get(key) or self.capture(x, cache, index, length)
        if captured is None:
            return self.static.step(x, cache, index, length)
        captured.x.copy_(x, False)
        captured.graph.replay()
        return captured.out

    def capture(self, x: paddle.Tensor, cache, index: paddle.Tensor, length: int) -> Captured | None:
        """Capture the bucket of x and length, check it against the eager step; None (and refused) on failure.
        Its warm-up and check steps write the keys and values the step itself is about to write."""
        key = (x.shape[0], length)
        try:
            buffer = x.clone()
            for _ in range(WARMUPS):
                self.static.step(buffer, cache, index, length)
            synchronize()
            graph = self.graph_class(self.device, self.pool)
            began = False
            try:
                graph.capture_begin()
                began = True
                out = self.static.step(buffer, cache, index, length)
            finally:
                try:  # even when capture_begin failed part way: a stream left capturing breaks every later launch
                    graph.capture_end()
                except Exception:
                    if began:
                        raise
            graph.replay()
            want = self.static.step(buffer, cache, index, length)
            synchronize()
            got, expected = out.astype("float32").numpy(), want.astype("float32").numpy()
            worst = relative_difference(got, expected)
            tolerance = TOLERANCE[self.static.dtype]
            if not worst <= tolerance:
                raise ValueError(f"replay differs from the eager step by {worst:.2e} (tolerance {tolerance:g})")
        except Exception as error:  # noqa: BLE001 - that bucket runs eagerly
            self.refused[key] = f"{type(error).__name__}: {error}"
            log.warning("no CUDA graph for %d rows x %d positions (%s): that bucket runs eagerly", *key,
                        self.refused[key])
            return None
        self.graphs[key] = Captured(graph, buffer, out)
        return self.graphs[key]

    def capture_all(self, cache, rows: list[int], lengths: list[int]) -> None:
        """Capture every bucket of `rows` x `lengths` at start, on the cache's scratch slot (position 0)."""
        if not self.available:
            return
        hidden = self.static.config.hidden_size
        rng, none = np.random.default_rng(0), np.zeros(0, np.int64)
        for bucket in rows:
            index = self.static.load_index(cache, bucket, none, none)  # every row padding
            # random rows (zeros would make every layer's output zero, and the check against the eager step empty)
            x = from_numpy(rng.standard_normal((bucket, 1, hidden)).astype(np.float32)).astype(self.static.dtype)
            for length in lengths:
                if (bucket, length) not in self.graphs and (bucket, length) not in self.refused:
                    self.capture(x, cache, index, length)

    def describe(self) -> dict[str, Any]:
        return {"cuda_graphs": len(self.graphs) if self.available else "not available",
                "eager_buckets": len(self.refused)}
