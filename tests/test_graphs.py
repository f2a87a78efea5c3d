"""model/graphs.py's capture, replay, check and fallback, on CPU with a stand-in for a CUDA graph that
replays by running the captured step again from the same buffers into the same output tensor."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from model.graphs import CapturedSteps, graphs_available
from model.runtime.gpu import GpuRuntime
from model.static_step import StaticStep
from test_static_step import gpu_kernels


class FakeGraph:
    """Records the step run while capturing; replay() runs it again from the same tensors and writes the same
    output tensor, as a CUDA graph's kernels do."""

    made: list["FakeGraph"] = []
    noise = 0.0
    fail_in_capture = False

    def __init__(self, device, pool):
        self.device, self.pool, self.calls, self.ended, self.replays = device, pool, [], False, 0
        FakeGraph.made.append(self)

    @staticmethod
    def new_pool():
        return 7

    def capture_begin(self):
        FakeGraph.capturing = self
        if FakeGraph.fail_in_capture:
            raise RuntimeError("operation not permitted when stream is capturing")

    def capture_end(self):
        self.ended = True
        FakeGraph.capturing = None

    def replay(self):
        self.replays += 1
        step, args, out = self.calls[-1]
        out.copy_(step(*args) * (1 + FakeGraph.noise), False)


FakeGraph.capturing = None


@pytest.fixture
def fake(monkeypatch):
    FakeGraph.made, FakeGraph.noise, FakeGraph.fail_in_capture = [], 0.0, False
    original = StaticStep.step

    def step(self, x, cache, index, length):
        out = original(self, x, cache, index, length)
        if FakeGraph.capturing is not None:
            FakeGraph.capturing.calls.append((lambda *a, s=self: original(s, *a), (x, cache, index, length), out))
        return out

    monkeypatch.setattr(StaticStep, "step", step)
    return FakeGraph


def runtime_with(model, fake, slots=4, row_length=256, monkeypatch=None, in_place=False):
    """A GPU runtime whose step replays from `fake` graphs; `in_place`: fused kernels and in-place attention (their
    stand-ins)."""
    if in_place:
        gpu_kernels(monkeypatch)
    runtime = GpuRuntime(model, eos_id=1, pad_id=0, previews=False, fused=in_place, in_place=in_place)
    assert runtime.static_step.in_place == in_place
    step = runtime.static_step
    runtime.batch = None
    from model.generation import DecodeBatch

    runtime.batch = DecodeBatch(model, slots=slots, max_len=row_length, forward_hidden=step.forward_hidden,
                                new_cache=step.new_cache)
    runtime.captured = CapturedSteps(step, "gpu:0", available=True, graph_class=fake)
    step.runner = runtime.captured
    return runtime, step


def inputs(model, rows, seed):
    return np.random.default_rng(seed).standard_normal((rows, 1, model.config.language.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("in_place", [False, True])
def test_replayed_steps_match_the_reference_as_inputs_change(model, fake, monkeypatch, in_place):
    runtime, step = runtime_with(model, fake, monkeypatch=monkeypatch, in_place=in_place)
    cache, reference = runtime.batch.cache, model.new_cache(4, 256)
    prompt = np.random.default_rng(0).standard_normal((2, 20, model.config.language.hidden_size)).astype(np.float32)
    step.forward_hidden(prompt, cache, [3, 1], [0, 0])
    model.forward_hidden(prompt, reference, [3, 1], [0, 0])
    for i in range(4):  # the same bucket each time: one capture, then replays with refilled buffers
        x = inputs(model, 2, i + 1)
        got = step.forward_hidden(x, cache, [3, 1], [20 + i, 20 + i]).numpy()
        np.testing.assert_allclose(got, model.forward_hidden(x, reference, [3, 1], [20 + i, 20 + i]).numpy(),
                                   rtol=0, atol=1e-4)
    assert list(runtime.captured.graphs) == [(2, 256 if in_place else 128)] and not runtime.captured.refused
    [graph] = fake.made
    assert graph.ended and graph.pool == 7 and graph.replays == 1 + 4  # its check, then each step


def test_a_graph_that_replays_wrong_is_refused_and_its_bucket_runs_eagerly(model, fake, caplog):
    fake.noise = 0.01
    runtime, step = runtime_with(model, fake)
    cache = runtime.batch.cache
    x = inputs(model, 1, 5)
    out = step.forward_hidden(x, cache, [0], [7])
    assert (1, 128) in runtime.captured.refused and "differs from the eager step" in runtime.captured.refused[(1, 128)]
    assert "no CUDA graph for 1 rows x 128 positions" in caplog.text
    fake.noise = 0.0
    again = step.forward_hidden(x, cache, [0], [7])  # eager now: the same as before
    np.testing.assert_allclose(again.numpy(), out.numpy(), rtol=0, atol=1e-6)
    assert runtime.describe()["eager_buckets"] == 1


def test_an_error_during_capture_ends_the_capture_and_falls_back(model, fake):
    fake.fail_in_capture = True
    runtime, step = runtime_with(model, fake)
    step.forward_hidden(inputs(model, 2, 1), runtime.batch.cache, [0, 1], [3, 3])
    [graph] = fake.made
    assert graph.ended and "not permitted" in runtime.captured.refused[(2, 128)]


@pytest.mark.parametrize("in_place", [False, True])
def test_capture_all_touches_only_the_scratch_slot(model, fake, monkeypatch, in_place):
    runtime, step = runtime_with(model, fake, slots=3, row_length=300, monkeypatch=monkeypatch, in_place=in_place)
    cache = runtime.batch.cache
    for k in cache.k:
        k.set_value(np.full(k.shape, 5.0, np.float32))
    runtime.captured.capture_all(cache, [1, 2, 4], step.length_buckets(300))
    lengths = (300,) if in_place else (128, 256, 300)  # in place: one graph per row bucket serves every length
    assert sorted(runtime.captured.graphs) == [(r, n) for r in (1, 2, 4) for n in lengths]
    view = cache.view(cache.k[0])
    assert (view[:3] == 5.0).all() and (view[3, 0] != 5.0).any()


def test_without_cuda_graphs_the_wrapper_runs_the_eager_step(model):
    assert not graphs_available("cpu") and not graphs_available(paddle.get_device())
    runtime = GpuRuntime(model, eos_id=1, pad_id=0, previews=False)
    runtime.open_cache(2, 200)
    assert runtime.describe()["cuda_graphs"] == "not available" and runtime.static_step.runner is runtime.captured
    out = runtime.static_step.forward_hidden(inputs(model, 1, 2), runtime.batch.cache, [1], [0])
    assert out.shape == [1, 1, model.config.language.hidden_size] and not runtime.captured.graphs
