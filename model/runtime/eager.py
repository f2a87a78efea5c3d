"""Eager Paddle on any device: the reference runtime (the interface: model/runtime/__init__.py).

Every image is decoded when its codes are done, in the caller's thread. Every request is prefilled
when it starts (its future done when it is returned), unless the runtime is given a `prefill_chunk`:
then prompts are prefilled in pieces between the steps (model/pieces.py), one piece per turn of the
scheduler (run_piece), and join the batch at the next poll(). A prompt that arrives while rows run
is cut into chunks of `prefill_chunk` tokens (and its image encoder, where the model's own runs,
into `vision_blocks` SigLIP blocks), so that the running rows wait for one piece at most. A prompt
that arrives when none run (alone, or with others at once) is one piece: no answer is under way to
wait for it, and pieces cost time (each reads the weights again, and the rows step after each with
fewer rows than they would later have together). Model/runtime/gpu.py and model/runtime/cpu.py's
OpenVINO decoder run so.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..generation import DecodeBatch, SamplingParams, checked_seeds, decode_images
from ..pieces import Pieces, advance, drain


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

    def __init__(self, model, *, eos_id: int, pad_id: int, previews: bool = True, prefill_chunk: int | None = None,
                 vision_blocks: int | None = None):
        """`previews`: fit the preview palette (one VQ decode). The cache comes after (open_cache), so that it
        can be sized from the memory the runtime's own programs leave.
        `prefill_chunk`: prompts in pieces between the steps, this many tokens a piece (over all the prompt's
        rows) while answers run; None: each prefilled whole as it starts. `vision_blocks`: SigLIP blocks a piece
        (None: the image encoder in one piece)."""
        import paddle

        self.model = model
        self.eos_id, self.pad_id = eos_id, pad_id
        self.prefill_chunk, self.vision_blocks = prefill_chunk, vision_blocks
        self.starts: collections.deque[tuple[Start, Future]] = collections.deque()  # prefills to run, in order
        self.joining: list[tuple[Start, Future, Any]] = []  # prefilled: they join the batch at poll()
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
        described = {"runtime": self.name, "device": self.device, "precision": str(self.model.dtype_name),
                     "programs": [], "prefill": "pieces" if self.prefill_chunk else "inline"}
        if self.prefill_chunk:
            described.update(prefill_chunk=self.prefill_chunk, vision_blocks=self.vision_blocks)
        return described

    # ---- requests

    def start(self, kind: str, rid: str, payload: dict[str, Any]) -> Future:
        cut = bool(self.prefill_chunk and self.batch.sequences)  # answers under way would wait for it whole
        try:
            start = self.prepare(kind, rid, payload, chunk=self.prefill_chunk if cut else None,
                                 vision_blocks=self.vision_blocks if cut else None)
        except Exception as error:  # noqa: BLE001 - this request fails alone
            return done(error=error)
        if self.prefill_chunk:
            future: Future = Future()
            self.starts.append((start, future))
            return future
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
        """Prefilled requests join the batch (between steps: their first events come before their next)."""
        joining, self.joining = self.joining, []
        for start, future, logits in joining:
            try:
                future.set_result(start.join(logits))
            except Exception as error:  # noqa: BLE001 - this request fails alone
                self.abandon(start)
                future.set_exception(error)

    def run_piece(self) -> bool:
        """The next piece of the first prefill waiting; True while prefills wait or have yet to join."""
        if self.starts:
            self.prefill_piece()
        return bool(self.starts or self.joining)

    def prefill_piece(self) -> None:
        start, future = self.starts[0]
        try:
            finished, logits = advance(start.pieces)
        except Exception as error:  # noqa: BLE001 - this request fails alone
            self.starts.popleft()
            self.abandon(start)
            future.set_exception(error)
            return
        if finished:
            self.starts.popleft()
            self.joining.append((start, future, logits))

    def background(self) -> list[Future]:
        return []

    def step(self):
        return self.batch.step()

    def step_each(self):
        return self.batch.step_each()

    def remove(self, rid: str) -> None:
        for waiting in (self.starts, self.joining):
            for entry in list(waiting):
                if entry[0].rid == rid:
                    waiting.remove(entry)
                    self.abandon(entry[0])
                    entry[1].cancel()
                    return
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
