"""The GPU runtime's static decode step (model/static_step.py), on CPU: the reference's results, few
operations, no host round trip inside a step, and the self-check that falls back to the eager step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import paddle

import model.llama as llama
from model.runtime.gpu import GpuRuntime
from model.selfcheck import count_ops, golden_check
from model.static_step import LENGTH_BUCKET, StaticStep, row_bucket

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


def test_the_golden_set_through_the_gpu_runtime_on_cpu():
    comparisons, ran = golden_check(GOLDEN, "cpu", "float32", runtime_class=GpuRuntime)
    assert ran["runtime"] == "gpu" and ran["step"] == "static"
    for c in comparisons:
        assert c.passed, c


def decode_inputs(model, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 1, model.config.language.hidden_size)).astype(np.float32)


def test_padded_rows_write_only_the_scratch_slot(model):
    """3 rows run at the 4-row bucket: the padding row writes the scratch slot, no row of a sequence."""
    step = StaticStep(model.language_model.model, "float32", fused=False)
    cache = step.new_cache(6, 300)
    cache.k[0].set_value(np.full(cache.k[0].shape, 7.0, np.float32))  # what was never written stays 7
    rows = np.array([4, 0, 2])
    hidden = step.forward_hidden(decode_inputs(model, 3), cache, rows, np.array([10, 200, 3]))
    assert hidden.shape == [3, 1, model.config.language.hidden_size] and row_bucket(3) == 4
    k = cache.view(cache.k[0])  # [slot, head, position, dim]
    written = [int((k[slot] != 7.0).any()) for slot in range(7)]
    assert written == [1, 0, 1, 0, 1, 0, 1]  # slots 0, 2, 4 and the scratch slot 6
    assert (k[4, :, 10] != 7).all() and (k[4, :, :10] == 7).all() and (k[4, :, 11:] == 7).all()
    assert (k[6, :, 0] != 7).all() and (k[0, :, 200] != 7).all() and (k[2, :, 3] != 7).all()


def test_a_decode_step_matches_the_reference_at_every_bucket(model):
    step = StaticStep(model.language_model.model, "float32", fused=False)
    static, reference = step.new_cache(9, 400), model.new_cache(9, 400)
    rng = np.random.default_rng(1)
    prompt = rng.standard_normal((8, 150, model.config.language.hidden_size)).astype(np.float32)
    slots = np.array([8, 1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_allclose(step.forward_hidden(prompt, static, slots, np.zeros(8)).numpy(),
                               model.forward_hidden(prompt, reference, slots, np.zeros(8)).numpy(), rtol=0, atol=1e-4)
    for rows in (1, 2, 3, 5, 8):
        x, start = decode_inputs(model, rows, rows), np.full(rows, 150 + rows)
        want = model.forward_hidden(x, reference, slots[:rows], start).numpy()
        np.testing.assert_allclose(step.forward_hidden(x, static, slots[:rows], start).numpy(), want, rtol=0, atol=1e-4)


def test_a_prompt_prefilled_in_chunks_matches_one_pass(model):
    """Chunks from later positions attend to what their rows cached: the same as the reference, in one pass."""
    step = StaticStep(model.language_model.model, "float32", fused=False)
    static, reference = step.new_cache(3, 400), model.new_cache(3, 400)
    prompt = np.random.default_rng(2).standard_normal((2, 300, model.config.language.hidden_size)).astype(np.float32)
    slots = np.array([2, 0])
    want = model.forward_hidden(prompt, reference, slots, np.zeros(2)).numpy()
    parts = [step.forward_hidden(prompt[:, a:b], static, slots, np.full(2, a)).numpy()
             for a, b in ((0, 128), (128, 129), (129, 300))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), want, rtol=0, atol=1e-4)
    x = decode_inputs(model, 2, 9)  # and a step after it
    np.testing.assert_allclose(step.forward_hidden(x, static, slots, np.full(2, 300)).numpy(),
                               model.forward_hidden(x, reference, slots, np.full(2, 300)).numpy(), rtol=0, atol=1e-4)


def step_parts(model, rows: int = 2):
    """A static step ready to run: (step, cache, x, index buffer, length)."""
    step = StaticStep(model.language_model.model, "float32", fused=False)
    cache = step.new_cache(4, 256)
    x = paddle.to_tensor(decode_inputs(model, rows))
    step.forward_hidden(x, cache, np.arange(rows), np.full(rows, 100))  # fills the bucket's index buffer
    return step, cache, x, step.buffers[row_bucket(rows)], LENGTH_BUCKET


def test_inside_a_step_nothing_is_read_back_or_made_from_host_data(model, monkeypatch):
    step, cache, x, index, length = step_parts(model)

    def refuse(*_, **__):
        raise AssertionError("a host round trip inside the step")

    for name in ("numpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(paddle.Tensor, name, refuse, raising=False)
    monkeypatch.setattr(paddle, "to_tensor", refuse)
    monkeypatch.setattr(paddle.Tensor, "set_value", refuse)
    with paddle.no_grad():
        step.step(x, cache, index, length)
    ops = count_ops(lambda: step.step(x, cache, index, length))
    monkeypatch.undo()
    made = {name: n for name, n in ops.items() if name in ("empty", "assign_value", "set_value")}
    assert not made, made


def layer_ops(monkeypatch, owner, name: str, run) -> float:
    """Paddle operations per call of owner.<name> (a decoder layer's forward) while run() runs."""
    import paddle.profiler as profiler

    original = getattr(owner, name)
    calls = []

    def recorded(*args, **kwargs):
        calls.append(1)
        with profiler.RecordEvent("janus.layer"):
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    ops = count_ops(run, within="janus.layer")
    monkeypatch.setattr(owner, name, original)
    return sum(ops.values()) / len(calls)


def test_fewer_operations_per_layer_than_the_reference(model, monkeypatch):
    """At 2 rows, in a decode step: the eager Paddle path a GPU took before (no numpy shortcuts) against the
    static step, unfused as on CPU (a GPU's fused RMSNorm takes 5 operations fewer each, 10 per layer)."""
    monkeypatch.setattr(llama, "CPU_NUMPY_LINEAR", False)
    monkeypatch.setattr(llama, "CPU_NUMPY_ATTENTION", False)
    cache = model.new_cache(4, 256)
    x = decode_inputs(model, 2)
    with paddle.no_grad():
        reference = layer_ops(monkeypatch, llama.DecoderLayer, "forward", lambda: model.forward_hidden(x, cache, [0, 2], [100, 100]))
    step, static_cache, x, index, length = step_parts(model)
    with paddle.no_grad():
        static = layer_ops(monkeypatch, step, "layer", lambda: step.step(x, static_cache, index, length))
    print(f"\noperations per layer at 2 rows: reference {reference:.0f}, static {static:.0f} (unfused)")
    assert static <= 41 and static < 0.85 * reference


def test_the_runtime_serves_the_eager_step_when_the_static_one_misses(model, monkeypatch, caplog):
    original = StaticStep.decode

    def off_by_a_little(self, embeds, cache, slots, positions):
        return original(self, embeds, cache, slots, positions) * 1.01

    monkeypatch.setattr(StaticStep, "decode", off_by_a_little)
    runtime = GpuRuntime(model, eos_id=1, pad_id=0, previews=False)
    assert runtime.describe()["step"] == "eager" and "relative difference" in runtime.describe()["step_fallback"]
    assert "did not match the reference" in caplog.text
    runtime.open_cache(2, 64)
    assert runtime.batch.forward_hidden == model.forward_hidden
