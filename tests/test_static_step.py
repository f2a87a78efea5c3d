"""The GPU runtime's static decode step (model/static_step.py), on CPU: the reference's results, few
operations, no host round trip inside a step, and the self-check that falls back to the eager step."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import paddle
import pytest

import model.llama as llama
from model.runtime.gpu import GpuRuntime, kernel_choices
from model.selfcheck import count_ops, golden_check
from model.static_step import StaticStep, row_bucket

GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


def test_the_golden_set_through_the_gpu_runtime_on_cpu():
    comparisons, ran = golden_check(GOLDEN, "cpu", "float32", runtime_class=GpuRuntime)
    assert ran["runtime"] == "gpu" and ran["step"] == "static"
    for c in comparisons:
        assert c.passed, c


def decode_inputs(model, rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, 1, model.config.language.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("kernels", ["unfused", "in place"])
def test_padded_rows_write_only_the_scratch_slot(model, monkeypatch, kernels):
    """3 rows run at the 4-row bucket: the padding row writes the scratch slot, no row of a sequence."""
    step = static_step(model, monkeypatch, kernels)
    cache = step.new_cache(6, 300)
    cache.k[0].set_value(np.full(cache.k[0].shape, 7.0, np.float32))  # what was never written stays 7
    rows = np.array([4, 0, 2])
    hidden = step.forward_hidden(decode_inputs(model, 3), cache, rows, np.array([10, 200, 3]))
    assert hidden.shape == [3, 1, model.config.language.hidden_size] and row_bucket(3) == 4
    k = cache.view(cache.k[0])  # [slot, position, head, dim]
    written = [int((k[slot] != 7.0).any()) for slot in range(7)]
    assert written == [1, 0, 1, 0, 1, 0, 1]  # slots 0, 2, 4 and the scratch slot 6
    assert (k[4, 10] != 7).all() and (k[4, :10] == 7).all() and (k[4, 11:] == 7).all()
    assert (k[6, 0] != 7).all() and (k[0, 200] != 7).all() and (k[2, 3] != 7).all()


GPU_KERNELS = ("fused_rms_norm", "fused_rotary_position_embedding", "scaled_dot_product_attention",
               "flash_attn_unpadded")


def gpu_kernels(monkeypatch) -> None:
    """Stand-ins on CPU for the GPU kernels the fused step calls, each with the contract Paddle documents for it,
    run inside a profiler event of its name: count_ops(as_one=GPU_KERNELS) then counts what a GPU launches.
    scaled_dot_product_attention stays Paddle's own: on CPU Paddle composes it of about ten operations, on a GPU
    it is one flash-attention or memory-efficient kernel. These check how the step calls the kernels; that the
    kernels do what their documents say is checked on the GPU itself (GpuRuntime.self_check)."""
    import paddle.incubate.nn.functional as incubate
    import paddle.nn.functional as F
    import paddle.nn.functional.flash_attention as flash
    import paddle.profiler as profiler

    def fused_rms_norm(x, norm_weight, norm_bias, epsilon, begin_norm_axis=1, bias=None, residual=None):
        assert norm_bias is None and bias is None and begin_norm_axis == x.ndim - 1
        with profiler.RecordEvent("fused_rms_norm"):
            summed = x if residual is None else x + residual
            x32 = summed.astype("float32")
            out = x32 * paddle.rsqrt((x32 * x32).mean(axis=-1, keepdim=True) + epsilon) * norm_weight.astype("float32")
            return out.astype(x.dtype), summed, None  # out, residual_out, inv_var

    def rope(q, k=None, v=None, sin=None, cos=None, position_ids=None, use_neox_rotary_style=True):
        assert not use_neox_rotary_style and v is None  # LLaMA's rotate_half: the halves rotate
        assert cos.shape == sin.shape and cos.shape[0] == 1 and cos.shape[2] == 1  # [1, positions, 1, head_dim]
        assert position_ids.shape == q.shape[:2] and position_ids.dtype == paddle.int64
        with profiler.RecordEvent("fused_rotary_position_embedding"):
            rows = [*position_ids.shape, 1, cos.shape[-1]]
            c = paddle.index_select(cos[0, :, 0], position_ids.reshape([-1])).reshape(rows)
            s = paddle.index_select(sin[0, :, 0], position_ids.reshape([-1])).reshape(rows)
            half = q.shape[-1] // 2

            def rotated(x):
                return x * c + paddle.concat([-x[..., half:], x[..., :half]], axis=-1) * s

            return rotated(q), rotated(k), None

    def flash_attn_unpadded(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                            dropout=0.0, causal=False, return_softmax=False, fixed_seed_offset=None, rng_name="",
                            training=True, name=None):
        """Sequence b's queries query[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] attend to its keys and values
        key[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]; a query of a sequence with no keys gives zeros."""
        assert query.ndim == key.ndim == value.ndim == 3 and key.shape == value.shape
        assert query.shape[1] % key.shape[1] == 0 and query.shape[2] == key.shape[2]
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == paddle.int32 and cu_seqlens_q.shape == cu_seqlens_k.shape
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int) and max_seqlen_k <= key.shape[0]
        assert dropout == 0.0 and not causal and not return_softmax and not training and fixed_seed_offset is None
        with profiler.RecordEvent("flash_attn_unpadded"):
            total_q, total_k = query.shape[0], key.shape[0]
            queries, keys = paddle.arange(total_q, dtype="int32"), paddle.arange(total_k, dtype="int32")
            sequence = paddle.searchsorted(cu_seqlens_q, queries, right=True) - 1  # each query's
            start = paddle.index_select(cu_seqlens_k, sequence)
            end = paddle.index_select(cu_seqlens_k, sequence + 1)
            visible = (keys.unsqueeze(0) >= start.unsqueeze(1)) & (keys.unsqueeze(0) < end.unsqueeze(1))  # [q, k]
            groups = query.shape[1] // key.shape[1]
            k32 = paddle.repeat_interleave(key.astype("float32"), groups, axis=1)
            v32 = paddle.repeat_interleave(value.astype("float32"), groups, axis=1)
            scores = paddle.einsum("qhd,khd->hqk", query.astype("float32"), k32) * scale
            scores = paddle.where(visible.unsqueeze(0), scores, paddle.full_like(scores, float("-inf")))
            weights = paddle.where(visible.unsqueeze(0), F.softmax(scores, axis=-1), paddle.zeros_like(scores))
            return paddle.einsum("hqk,khd->qhd", weights, v32).astype(query.dtype), None

    attention = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        with profiler.RecordEvent("scaled_dot_product_attention"):
            return attention(*args, **kwargs)

    monkeypatch.setattr(incubate, "fused_rms_norm", fused_rms_norm)
    monkeypatch.setattr(incubate, "fused_rotary_position_embedding", rope)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(flash, "flash_attn_unpadded", flash_attn_unpadded)


# The GPU's kernel choices (GpuRuntime tries them in this order): fused norm and rotary, in-place attention.
KERNELS = {"unfused": (False, False), "fused": (True, False), "in place": (False, True),
           "fused, in place": (True, True)}


def static_step(model, monkeypatch, kernels: str) -> StaticStep:
    """The static step with a choice of KERNELS (the GPU ones through their stand-ins)."""
    fused, in_place = KERNELS[kernels]
    if fused or in_place:
        gpu_kernels(monkeypatch)
    return StaticStep(model.language_model.model, "float32", fused=fused, in_place=in_place)


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_decode_step_matches_the_reference_at_every_bucket(model, monkeypatch, kernels):
    step = static_step(model, monkeypatch, kernels)
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


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_prompt_prefilled_in_chunks_matches_one_pass(model, monkeypatch, kernels):
    """Chunks from later positions attend to what their rows cached: the same as the reference, in one pass."""
    step = static_step(model, monkeypatch, kernels)
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


def test_in_place_attention_reads_each_row_its_own_run_of_the_cache(model):
    """The packed index of an in-place step: rows in slot order (padding last), and the key runs (cu_seqlens_k)
    each row's cached positions, the gaps between them sequences of no query."""
    step = StaticStep(model.language_model.model, "float32", fused=False, in_place=True)
    cache = step.new_cache(6, 100)
    slots, positions = np.array([4, 0, 2]), np.array([10, 50, 3])
    index = step.pack(cache, 4, slots, positions)
    step_slots, step_positions, order, inverse, runs = np.split(index, [4, 8, 12, 16])
    assert step_slots.tolist() == [0, 2, 4, 6] and step_positions.tolist() == [50, 3, 10, 0]
    assert order.tolist() == [1, 2, 0, 3] and inverse[:3].tolist() == [2, 0, 1]  # the batch's rows, and back
    assert runs.tolist() == [0, 0, 51, 200, 204, 400, 411, 600, 601]  # gap, run, gap, run, ...: never backwards
    short = step.new_cache(2, 2)  # more padding rows than the scratch slot has positions: empty runs past it
    index = step.pack(short, 8, np.array([1]), np.array([1]))
    step_slots, step_positions, _, _, runs = np.split(index, [8, 16, 24, 32])
    assert step_slots.tolist() == [1] + [2] * 7 and step_positions.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    assert runs.tolist() == [0, 2, 4, 4, 5, 5, 6] + [6] * 10 and (np.diff(runs) >= 0).all()
    step.index_buffer(4)
    assert step.query_runs[4].numpy().tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # a gap has no query, a run one
    assert step.length_buckets(100) == [100]  # one graph per row bucket: a row reads its run whatever its length
    unsorted = StaticStep(model.language_model.model, "float32", fused=False, in_place=False).pack(cache, 4, slots,
                                                                                                   positions)
    assert unsorted[:4].tolist() == [4, 0, 2, 6] and unsorted[8:12].tolist() == [0, 1, 2, 3]  # gathers: as given


def step_parts(model, monkeypatch=None, rows: int = 2, kernels: str = "unfused"):
    """A static step ready to run: (step, cache, x, index buffer, length)."""
    step = static_step(model, monkeypatch, kernels)
    cache = step.new_cache(4, 256)
    x = paddle.to_tensor(decode_inputs(model, rows))
    step.forward_hidden(x, cache, np.arange(rows), np.full(rows, 100))  # fills the bucket's index buffer
    return step, cache, x, step.buffers[row_bucket(rows)], step.length_buckets(256)[0]


@pytest.mark.parametrize("kernels", ["unfused", "fused, in place"])
def test_inside_a_step_nothing_is_read_back_or_made_from_host_data(model, monkeypatch, kernels):
    step, cache, x, index, length = step_parts(model, monkeypatch, kernels=kernels)

    def refuse(*_, **__):
        raise AssertionError("a host round trip inside the step")

    for name in ("numpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(paddle.Tensor, name, refuse, raising=False)
    monkeypatch.setattr(paddle, "to_tensor", refuse)
    monkeypatch.setattr(paddle.Tensor, "set_value", refuse)
    with paddle.no_grad():
        step.step(x, cache, index, length)
    ops = count_ops(lambda: step.step(x, cache, index, length), as_one=GPU_KERNELS)  # a kernel's own: not the step's
    monkeypatch.undo()
    made = {name: n for name, n in ops.items() if name in ("empty", "assign_value", "set_value")}
    assert not made, made


def layer_ops(monkeypatch, owner, name: str, run, as_one: tuple[str, ...] = ()) -> float:
    """Paddle operations per call of owner.<name> (a decoder layer's forward) while run() runs, by name."""
    import paddle.profiler as profiler

    original = getattr(owner, name)
    calls = []

    def recorded(*args, **kwargs):
        calls.append(1)
        with profiler.RecordEvent("janus.layer"):
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    ops = count_ops(run, within="janus.layer", as_one=as_one)
    monkeypatch.setattr(owner, name, original)
    return {op: n / len(calls) for op, n in ops.items()}


def test_fewer_operations_per_layer_than_the_reference(model, monkeypatch):
    """At 2 rows, in a decode step: the eager Paddle path a GPU took before (no numpy shortcuts) against the
    static step, unfused as it runs on CPU, and as a GPU runs it: unfused, and with the fused kernels."""
    monkeypatch.setattr(llama, "CPU_NUMPY_LINEAR", False)
    monkeypatch.setattr(llama, "CPU_NUMPY_ATTENTION", False)
    cache = model.new_cache(4, 256)
    x = decode_inputs(model, 2)
    with paddle.no_grad():
        reference = sum(layer_ops(monkeypatch, llama.DecoderLayer, "forward",
                                  lambda: model.forward_hidden(x, cache, [0, 2], [100, 100])).values())
    counts, kernels = {}, {}
    for kind, choice, as_one in (("unfused, on CPU", "unfused", ()), ("unfused, on a GPU", "unfused", GPU_KERNELS),
                                 ("fused, on a GPU", "fused", GPU_KERNELS),
                                 ("fused, in place, on a GPU", "fused, in place", GPU_KERNELS)):
        with monkeypatch.context() as patch:
            gpu_kernels(patch)
            step, static_cache, x, index, length = step_parts(model, patch, kernels=choice)
            with paddle.no_grad():
                ops = layer_ops(patch, step, "layer", lambda: step.step(x, static_cache, index, length), as_one)
            counts[kind] = sum(ops.values())
            kernels[kind] = sum(n for op, n in ops.items() if op != "reshape")  # views: no kernel runs
    print(f"\noperations per layer at 2 rows: reference {reference:.0f}, static "
          + ", ".join(f"{counts[kind]:.0f} {kind} ({kernels[kind]:.0f} not views)" for kind in counts))
    assert counts["unfused, on CPU"] <= 42 and counts["unfused, on a GPU"] <= 34 and counts["fused, on a GPU"] <= 18
    assert kernels["fused, on a GPU"] <= 14 and counts["fused, on a GPU"] < 0.4 * reference
    assert counts["fused, in place, on a GPU"] <= 15 and kernels["fused, in place, on a GPU"] <= 12


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


def test_the_gpu_kernels_are_tried_best_first():
    assert kernel_choices("cpu", "float32", None, None) == [{"fused": False, "in_place": False}]
    assert kernel_choices("gpu:0", "float32", None, None) == [  # flash_attn_unpadded takes half precision alone
        {"fused": True, "in_place": False}, {"fused": False, "in_place": False}]
    assert kernel_choices("gpu:1", "bfloat16", None, None) == [
        {"fused": True, "in_place": True}, {"fused": True, "in_place": False},
        {"fused": False, "in_place": True}, {"fused": False, "in_place": False}]
    assert kernel_choices("gpu:0", "float16", False, True) == [{"fused": False, "in_place": True}]


def test_a_gpu_kernel_that_misses_is_dropped_alone(model, monkeypatch, caplog):
    """In-place attention fails on this 'GPU': the runtime serves the static step with the fused kernels and
    gathered attention, and says why."""
    import paddle.nn.functional.flash_attention as flash

    import model.runtime.gpu as gpu

    gpu_kernels(monkeypatch)

    def no_kernel(*_, **__):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(flash, "flash_attn_unpadded", no_kernel)
    monkeypatch.setattr(gpu, "kernel_choices", lambda device, dtype, fused, in_place: kernel_choices(
        "gpu:0", "bfloat16", fused, in_place))
    described = GpuRuntime(model, eos_id=1, pad_id=0, previews=False).describe()
    assert described["step"] == "static" and described["fused_kernels"] and not described["in_place_attention"]
    assert described["step_fallback"].startswith("fused kernels, in-place attention: RuntimeError: no kernel image")
    assert "did not match the reference" in caplog.text


def test_the_golden_set_through_the_gpu_runtime_with_in_place_attention(model, monkeypatch):
    gpu_kernels(monkeypatch)
    runtime_class = functools.partial(GpuRuntime, fused=True, in_place=True)
    comparisons, ran = golden_check(GOLDEN, "cpu", "float32", runtime_class=runtime_class)
    assert ran["step"] == "static" and ran["fused_kernels"] and ran["in_place_attention"]
    for c in comparisons:
        assert c.passed, c
