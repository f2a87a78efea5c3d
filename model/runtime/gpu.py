"""Eager Paddle with the static-shape decode step (model/static_step.py): what a GPU runs.

Everything but the step is the eager runtime's (model/runtime/eager.py). Before it serves, the step is
checked against the reference forward (model/llama.py) on the device it will run on: a prefill and a
few decode steps of random rows, one of them padded up to its bucket. On any error or a result out of
tolerance it logs why and the runtime serves the reference forward instead.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..generation import DecodeBatch
from ..graphs import CapturedSteps
from ..static_step import CAPTURED_AT_START, StaticStep, row_bucket
from .eager import EagerRuntime

log = logging.getLogger("janus.runtime")

# The largest difference of the final hidden states from the reference's, relative to their largest value.
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


class GpuRuntime(EagerRuntime):
    name = "gpu"

    def __init__(self, model, *, eos_id: int, pad_id: int, previews: bool = True, fused: bool | None = None):
        """`fused`: Paddle's fused RMSNorm in the static step; by default tried first off CPU, then without."""
        super().__init__(model, eos_id=eos_id, pad_id=pad_id, previews=previews)
        self.captured: CapturedSteps | None = None
        self.step_kind, self.self_check_error = "eager", None
        on_cpu = self.device.startswith("cpu")
        errors = []
        for choice in [fused] if fused is not None else ([False] if on_cpu else [True, False]):
            self.static_step = StaticStep(model.language_model.model, model.dtype_name, fused=choice)
            try:
                error = self.self_check()
            except Exception as failure:  # noqa: BLE001 - any failure means the next choice, then the reference
                error = f"{type(failure).__name__}: {failure}"
            if error is None:
                self.step_kind = "static"
                break
            errors.append(f"{'fused' if choice else 'unfused'} norms: {error}")
            log.warning("the static decode step (%s) did not match the reference on %s: %s",
                        "fused norms" if choice else "unfused norms", self.device, error)
        if self.step_kind != "static":
            self.self_check_error = "; ".join(errors)
            log.warning("serving the eager decode step on %s", self.device)

    def self_check(self, rows: int = 3, prompt: int = 5, steps: int = 3) -> str | None:
        """None when the static step gives the reference's hidden states within tolerance, else why not."""
        model = self.model
        hidden = model.config.language.hidden_size
        rng = np.random.default_rng(0)
        length = prompt + steps + 1
        reference = model.new_cache(rows + 1, length)
        static = self.static_step.new_cache(rows + 1, length)
        slots = np.arange(rows)[::-1].copy() + 1  # not the identity: rows land in other slots
        worst = 0.0
        for start in [0] + [prompt + i for i in range(steps)]:
            t = prompt if start == 0 else 1
            embeds = rng.standard_normal((rows, t, hidden)).astype(np.float32)
            want = model.forward_hidden(embeds, reference, slots, np.full(rows, start)).astype("float32").numpy()
            got = self.static_step.forward_hidden(embeds, static, slots, np.full(rows, start)).astype("float32").numpy()
            worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)))
        tolerance = SELF_CHECK_TOLERANCE[model.dtype_name]
        if not worst <= tolerance:
            return f"largest relative difference {worst:.2e}, tolerance {tolerance:g}"
        return None

    def open_cache(self, slots: int, row_length: int) -> None:
        """The cache, and a CUDA graph of the step for every bucket it can run at up to CAPTURED_AT_START rows
        (where the device has them; larger buckets are captured when first used)."""
        if self.step_kind != "static":
            return super().open_cache(slots, row_length)
        step = self.static_step
        self.batch = DecodeBatch(self.model, slots=slots, max_len=row_length, forward_hidden=step.forward_hidden,
                                 new_cache=step.new_cache)
        self.captured = CapturedSteps(step, self.device)
        step.runner = self.captured
        largest = min(row_bucket(slots), CAPTURED_AT_START)
        rows = [1 << i for i in range(largest.bit_length())]
        self.captured.capture_all(self.batch.cache, rows, step.length_buckets(row_length))

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "step": self.step_kind, "fused_norms": self.static_step.fused}
        if self.captured is not None:
            described.update(self.captured.describe())
        if self.self_check_error:
            described["step_fallback"] = self.self_check_error
        return described
