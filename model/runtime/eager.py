"""Eager Paddle on any device: the reference runtime (the interface: model/runtime/__init__.py).

Every request is prefilled when it starts and every image decoded when its codes are done, in the
caller's thread: its futures are done when they are returned. This is what a GPU runs.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..generation import DecodeBatch, SamplingParams, checked_seeds, decode_images
from ..pieces import Pieces, drain


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


@dataclasses.dataclass
class Start:
    """A request's start: its prefill's pieces (model/pieces.py), then `join` with their result (its rows join
    the batch; its first events). Until then its rows are its own (EagerRuntime.abandon frees them)."""

    rid: str
    slots: list[int]
    pieces: Pieces
    join: Callable[[Any], list]


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
            start = self.prepare(kind, rid, payload)
        except Exception as error:  # noqa: BLE001 - this request fails alone
            return done(error=error)
        try:
            return done(start.join(drain(start.pieces)))
        except Exception as error:  # noqa: BLE001 - this request fails alone
            self.abandon(start)
            return done(error=error)

    def abandon(self, start: Start) -> None:
        """Free the rows of a start that failed or was cancelled: in its prefill, or as it joined the batch."""
        if start.rid in self.batch.sequences:
            self.batch.remove(start.rid)
        else:
            start.pieces.close()
            self.batch.pool.give_back(start.slots)

    def prepare(self, kind: str, rid: str, payload: dict[str, Any], *, chunk: int | None = None,
                vision_blocks: int | None = None) -> Start:
        """A request's start, its rows taken: its prefill in pieces (DecodeBatch.prefill_text_pieces /
        prefill_image_pieces: chunks of `chunk` tokens, `vision_blocks` SigLIP blocks; None: one piece), and
        how it joins the batch."""
        batch = self.batch
        if kind == "understand":
            ids = payload["input_ids"]
            [slot] = slots = [batch.reserve_text(len(ids), payload["max_new_tokens"])]
            pieces = batch.prefill_text_pieces(slot, ids, image_mask=payload["image_mask"],
                                               pixel_values=payload["pixel_values"], chunk=chunk,
                                               vision_blocks=vision_blocks)
            return Start(rid, slots, pieces, lambda logits: batch.start_text(rid, slot, len(ids), logits,
                                                                              **self.text_options(payload)))
        prompt, seeds = payload["prompt_ids"], checked_seeds(payload["seeds"], payload["n"])
        slots = batch.reserve_images(len(prompt), payload["n"])
        pieces = batch.prefill_image_pieces(slots, prompt, pad_id=self.pad_id, chunk=chunk)
        return Start(rid, slots, pieces, lambda logits: batch.start_images(
            rid, slots, len(prompt), logits, params=sampling(payload), seeds=seeds, cfg_weight=payload["cfg_weight"]))

    def text_options(self, payload: dict[str, Any]) -> dict[str, Any]:
        """How an understanding request samples and stops (DecodeBatch.add_text / start_text)."""
        return {"params": sampling(payload), "seed": payload["seed"],
                "max_new_tokens": payload["max_new_tokens"], "eos_id": self.eos_id}

    def poll(self) -> None:
        """Nothing runs in the background."""

    def run_piece(self) -> bool:
        """Nothing is run in pieces between the steps."""
        return False

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
