"""Eager Paddle on any device: the reference runtime (the interface: model/runtime/__init__.py).

Every request is prefilled when it starts and every image decoded when its codes are done, in the
caller's thread: its futures are done when they are returned. This is what a GPU runs.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..generation import DecodeBatch, SamplingParams, decode_images


def done(result=None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def sampling(payload: dict[str, Any]) -> SamplingParams:
    """How a request samples: image payloads carry no penalties."""
    return SamplingParams(payload["temperature"], payload["top_k"], payload["top_p"],
                          payload.get("presence_penalty", 0.0), payload.get("frequency_penalty", 0.0))


class EagerRuntime:
    name = "eager"

    def __init__(self, model, *, eos_id: int, pad_id: int, previews: bool = True):
        """`previews`: fit the preview palette (one VQ decode). The cache comes after (open_cache), so that it
        can be sized from the memory the runtime's own programs leave."""
        import paddle

        self.model = model
        self.eos_id, self.pad_id = eos_id, pad_id
        self.batch: DecodeBatch | None = None
        self.device = str(paddle.get_device())
        self.palette = None
        if previews:
            self.palette = self.fit_palette()

    def fit_palette(self):
        from ..preview import PreviewPalette

        return PreviewPalette.fit(self.model.gen_vision_model.codebook.weight.numpy(), self.decode)

    def open_cache(self, slots: int, row_length: int) -> None:
        """The KV cache: `slots` rows of `row_length` positions."""
        self.batch = DecodeBatch(self.model, slots=slots, max_len=row_length, allocate=self.cache_allocator())

    def cache_allocator(self):
        """How the cache's buffers are made (KVCache's `allocate`); None: zeroed Paddle tensors."""
        return None

    # ---- what the scheduler reads

    @property
    def free_rows(self) -> int:
        return self.batch.pool.free  # rows reserved for prefills under way (CpuRuntime) are taken already

    @property
    def rows_in_use(self) -> int:
        return self.batch.rows

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "device": self.device, "precision": str(self.model.dtype_name),
                "programs": [], "prefill": "inline"}

    # ---- requests

    def start(self, kind: str, rid: str, payload: dict[str, Any]) -> Future:
        try:
            if kind == "understand":
                events = self.batch.add_text(rid, payload["input_ids"], image_mask=payload["image_mask"],
                                             pixel_values=payload["pixel_values"], **self.text_options(payload))
            else:
                events = self.batch.add_images(
                    rid, payload["prompt_ids"], pad_id=self.pad_id, n=payload["n"], cfg_weight=payload["cfg_weight"],
                    params=sampling(payload), seeds=payload["seeds"])
        except Exception as error:  # noqa: BLE001 - this request fails alone; DecodeBatch freed its rows
            return done(error=error)
        return done(events)

    def text_options(self, payload: dict[str, Any]) -> dict[str, Any]:
        """How an understanding request samples and stops (DecodeBatch.add_text / start_text)."""
        return {"params": sampling(payload), "seed": payload["seed"],
                "max_new_tokens": payload["max_new_tokens"], "eos_id": self.eos_id}

    def poll(self) -> None:
        """Nothing runs in the background."""

    def background(self) -> list[Future]:
        return []

    def step(self):
        return self.batch.step()

    def step_each(self):
        return self.batch.step_each()

    def remove(self, rid: str) -> None:
        self.batch.remove(rid)

    # ---- images

    def decode(self, codes) -> np.ndarray:
        """[n, 576] codes -> [n, 384, 384, 3] uint8."""
        return decode_images(self.model, codes)

    def decode_images(self, codes) -> Future:
        started = time.perf_counter()
        try:
            images = self.decode(codes)
        except Exception as error:  # noqa: BLE001 - this request fails alone
            return done(error=error)
        return done((images, time.perf_counter() - started))

    def previews(self, rid: str):
        sequence = self.batch.sequences.get(rid)
        if self.palette is None or sequence is None:
            return None
        return self.palette.previews(np.array(sequence.codes, np.int64))
