"""Eager Paddle with the static-shape decode step (model/static_step.py): what a GPU runs.

The model is the eager runtime's (model/runtime/eager.py), with two differences.

- The step. Before it serves, the static step is checked against the reference forward (model/llama.py)
  on the device it will run on: a prefill and a few decode steps of random rows, one of them padded up
  to its bucket. On any error or a result out of tolerance it logs why and the runtime serves the
  reference forward instead.
- Prefills (as the eager runtime runs them with a prefill_chunk) and VQ decodes run in pieces between
  the steps (model/pieces.py), one piece per turn of the scheduler (run_piece), alternating between the
  two when both wait: a prompt's image encoder a few SigLIP blocks at a time, then its tokens a chunk at
  a time (a prompt that arrives when no rows run: one piece); finished images a few at once, a residual
  block at a time. The running rows then wait for one piece at most, never for a whole prompt or decode. Everything runs on the loop's thread and the device's one stream: Paddle's current stream is
  one setting per device for the whole process (paddle.device.set_stream), so a thread decoding on a
  stream of its own would move the loop's kernels, and its graph captures, onto that stream too.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..generation import DecodeBatch, to_uint8_images
from ..graphs import CapturedSteps, relative_difference
from ..pieces import Pieces, advance
from ..static_step import CAPTURED_AT_START, IN_PLACE_DTYPES, StaticStep, row_bucket
from .eager import EagerRuntime

log = logging.getLogger("janus.runtime")

# The largest difference of the final hidden states from the reference's, relative to their largest value.
SELF_CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}

# The size of a piece of work between two steps: about one decode step at 32 rows on an H100 (3 ms), on
# paper until a GPU measures it (docs/gpu-runtime.md).
PREFILL_CHUNK = 512  # prompt tokens per piece, over all the prompt's rows
VISION_BLOCKS = 8  # SigLIP blocks per piece
VQ_BATCH = 4  # images VQ-decoded together (more when one request has more)


@dataclasses.dataclass
class Decode:
    """The images of some requests, VQ-decoded together in pieces: each request's codes and future."""

    requests: list[tuple[np.ndarray, Future]]
    pieces: Pieces | None  # made at its first piece
    started: float


def kernel_choices(device: str, dtype: str, fused: bool | None, in_place: bool | None) -> list[dict[str, bool]]:
    """The static step's kernels to try, best first: each GPU-only one (fused norm and rotary; in-place attention,
    which takes bfloat16 and float16 alone) with it, then without, unless given; on CPU neither."""
    on_cpu = device.startswith("cpu")
    fused_options = [fused] if fused is not None else ([False] if on_cpu else [True, False])
    in_place_options = [in_place] if in_place is not None else (
        [False] if on_cpu or dtype not in IN_PLACE_DTYPES else [True, False])
    return [{"fused": f, "in_place": p} for f in fused_options for p in in_place_options]


def kernels_named(choice: dict[str, bool]) -> str:
    return (f"{'fused' if choice['fused'] else 'unfused'} kernels, "
            f"{'in-place' if choice['in_place'] else 'gathered'} attention")


class GpuRuntime(EagerRuntime):
    name = "gpu"

    def __init__(self, model, *, eos_id: int, pad_id: int, previews: bool = True, fused: bool | None = None,
                 in_place: bool | None = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 vision_blocks: int = VISION_BLOCKS, vq_batch: int = VQ_BATCH):
        """`fused`: Paddle's fused RMSNorm and rotary kernels in the static step (model/static_step.py); `in_place`:
        its decode attention over the cache as it lies (varlen flash attention; bfloat16 and float16). By default
        each is tried first off CPU, then without.
        `prefill_chunk`, `vision_blocks`, `vq_batch`: the pieces' sizes (prefill_chunk None: every prompt whole,
        as it starts)."""
        super().__init__(model, eos_id=eos_id, pad_id=pad_id, previews=previews, prefill_chunk=prefill_chunk,
                         vision_blocks=vision_blocks)
        self.vq_batch = vq_batch
        self.images: collections.deque[tuple[np.ndarray, Future]] = collections.deque()  # codes to decode
        self.decoding: Decode | None = None
        self.turns = 0
        self.captured: CapturedSteps | None = None
        self.step_kind = "eager"
        errors = []
        for choice in kernel_choices(self.device, model.dtype_name, fused, in_place):
            self.static_step = StaticStep(model.language_model.model, model.dtype_name, **choice)
            try:
                error = self.self_check()
            except Exception as failure:  # noqa: BLE001 - any failure means the next choice, then the reference
                error = f"{type(failure).__name__}: {failure}"
            if error is None:
                self.step_kind = "static"
                break
            errors.append(f"{kernels_named(choice)}: {error}")
            log.warning("the static decode step (%s) did not match the reference on %s: %s", kernels_named(choice),
                        self.device, error)
        self.self_check_error = "; ".join(errors) or None  # why the step runs without a better choice's kernels
        if self.step_kind != "static":
            log.warning("serving the eager decode step on %s", self.device)

    def self_check(self, rows: int = 3, prompt: int = 5, chunk: int = 3, steps: int = 3) -> str | None:
        """None when the static step gives the reference's hidden states within tolerance, else why not: a prompt
        prefilled as a first chunk and a later one (as the runtime's pieces run it), then decode steps."""
        model = self.model
        hidden = model.config.language.hidden_size
        rng = np.random.default_rng(0)
        length = prompt + steps + 1
        reference = model.new_cache(rows + 1, length)
        static = self.static_step.new_cache(rows + 1, length)
        slots = np.arange(rows)[::-1].copy() + 1  # not the identity: rows land in other slots
        worst = 0.0
        for start, t in [(0, chunk), (chunk, prompt - chunk)] + [(prompt + i, 1) for i in range(steps)]:
            embeds = rng.standard_normal((rows, t, hidden)).astype(np.float32)
            want = model.forward_hidden(embeds, reference, slots, np.full(rows, start)).astype("float32").numpy()
            got = self.static_step.forward_hidden(embeds, static, slots, np.full(rows, start)).astype("float32").numpy()
            worst = max(worst, relative_difference(got, want))
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

    # ---- prefills and VQ decodes in pieces

    def decode_images(self, codes) -> Future:
        future: Future = Future()
        self.images.append((np.asarray(codes, np.int64), future))
        return future

    def run_piece(self) -> bool:
        """The next piece of the first prefill or of the VQ decode, taking turns when both wait."""
        decodes = bool(self.images or self.decoding)
        if self.starts and (not decodes or self.turns % 2 == 0):
            self.prefill_piece()
        elif decodes:
            self.decode_piece()
        self.turns += 1
        return bool(self.starts or self.joining or self.images or self.decoding)

    def decode_piece(self) -> None:
        if self.decoding is None:
            requests, images = [], 0
            while self.images and (not requests or images + len(self.images[0][0]) <= self.vq_batch):
                codes, future = self.images.popleft()
                if future.set_running_or_notify_cancel():  # else cancelled while it waited: never decoded
                    requests.append((codes, future))
                    images += len(codes)
            if not requests:
                return
            self.decoding = Decode(requests, None, time.perf_counter())
        decoding = self.decoding
        try:
            if decoding.pieces is None:
                decoding.pieces = self.model.decode_image_pieces(np.concatenate([c for c, _ in decoding.requests]))
            finished, pixels = advance(decoding.pieces)
            if finished:
                images = to_uint8_images(pixels.numpy())
        except Exception as error:  # noqa: BLE001 - its requests fail; alone, if there are several
            self.decoding = None
            self.fail_decode(decoding.requests, error)
            return
        if finished:
            self.decoding = None
            seconds = time.perf_counter() - decoding.started
            for codes, future in decoding.requests:
                future.set_result((images[: len(codes)], seconds))
                images = images[len(codes):]

    def fail_decode(self, requests: list[tuple[np.ndarray, Future]], error: BaseException) -> None:
        """A decode of several requests failed: each decoded alone, in one call (the eager runtime's), so that a
        failure is its own."""
        if len(requests) == 1:
            requests[0][1].set_exception(error)
            return
        for codes, future in requests:
            alone = EagerRuntime.decode_images(self, codes)  # done: its (images, seconds), or its own error
            if alone.exception() is not None:
                future.set_exception(alone.exception())
            else:
                future.set_result(alone.result())

    def describe(self) -> dict[str, Any]:
        static = self.step_kind == "static"
        described = {**super().describe(), "step": self.step_kind, "fused_kernels": static and self.static_step.fused,
                     "in_place_attention": static and self.static_step.in_place, "vq_batch": self.vq_batch}
        if self.captured is not None:
            described.update(self.captured.describe())
        if self.self_check_error:
            described["step_fallback"] = self.self_check_error
        return described
