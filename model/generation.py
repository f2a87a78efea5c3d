"""Sampling and Janus's two generation algorithms, step by step.

`DecodeBatch` holds every running sequence of one worker in one KV cache:
understanding sequences (one row each) and image requests (two rows per
image: conditional and unconditional, as the reference builds them). Each
`step()` runs one forward pass over all rows, so sequences of both kinds join
and leave between steps (continuous batching). `generate_text` and
`generate_images` run whole requests on top of it.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np
import paddle

from .pieces import Pieces, drain
from .sampling import RowParams, SamplingParams, cfg, new_seed, penalize, sample, uniforms
from .tensors import from_numpy

IMAGE_TOKENS = 576  # 24 x 24 codes per 384 x 384 image


def to_uint8_images(decoded: np.ndarray) -> np.ndarray:
    """[N,3,H,W] float in [-1,1] -> [N,H,W,3] uint8, truncating as the reference does."""
    pixels = np.clip((decoded.transpose(0, 2, 3, 1) + 1) / 2 * 255, 0, 255)
    return pixels.astype(np.uint8)


def decode_images(model, codes: np.ndarray) -> np.ndarray:
    """[N,576] image tokens -> [N,384,384,3] uint8 images (VQ decode in float32)."""
    decoded = model.decode_image_tokens(from_numpy(np.asarray(codes, np.int64)))
    return to_uint8_images(decoded.numpy())


class SlotPool:
    """Which rows of the KV cache are free; the lowest free rows are taken first.

    Lowest first keeps the rows in use packed together, so that a step's rows, in slot
    order, mostly form runs of consecutive slots: CPU attention reads each run as one view.
    """

    def __init__(self, slots: int):
        self._free = list(range(slots))  # a heap

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise CacheFullError(f"{count} cache rows asked, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def give_back(self, slots: list[int]) -> None:
        for slot in slots:
            heapq.heappush(self._free, slot)


class CacheFullError(RuntimeError):
    pass


@dataclasses.dataclass
class TextSequence:
    """One understanding request: one cache row."""

    key: Any
    slot: int
    length: int  # positions already in the cache
    params: SamplingParams
    seed: int  # its random numbers: model/sampling.py's uniforms(seed, token index)
    max_new_tokens: int
    eos_id: int
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def rows(self) -> int:
        return 1


@dataclasses.dataclass
class ImageSequence:
    """One text-to-image request: rows 2i (conditional) and 2i+1 (unconditional) per image."""

    key: Any
    slots: list[int]
    length: int
    params: SamplingParams
    seeds: list[int]  # image i's random numbers: uniforms(seeds[i], step)
    cfg_weight: float
    codes: list[list[int]]

    @property
    def rows(self) -> int:
        return len(self.slots)

    @property
    def step(self) -> int:
        return len(self.codes[0])


@dataclasses.dataclass
class StepEvent:
    """What one sequence produced in one step (or prefill)."""

    key: Any
    kind: str  # "token" | "progress" | "text_done" | "codes_done"
    token: int | None = None
    step: int | None = None
    finish_reason: str | None = None
    codes: np.ndarray | None = None  # [n, 576] when an image request has all its tokens


class DecodeBatch:
    """All running sequences of one model, sharing one preallocated KV cache."""

    def __init__(self, model, *, slots: int, max_len: int, forward_hidden=None, encode_images=None,
                 allocate=None, new_cache=None):
        """`forward_hidden`, `encode_images`, `new_cache`: other implementations of the model's methods of those
        names (model.cpu_engine's, model.cpu_vision's, model.static_step's); `allocate`: the cache's buffers
        (KVCache)."""
        self.model = model
        self.forward_hidden = forward_hidden or model.forward_hidden
        self.encode_images = encode_images or model.encode_images
        self.text_logits, self.image_logits = model.text_logits, model.image_logits  # model/cpu_heads.py's on CPU
        self.max_len = max_len
        self.cache = (new_cache or model.new_cache)(slots, max_len, allocate=allocate)
        self.pool = SlotPool(slots)
        self.sequences: dict[Any, TextSequence | ImageSequence] = {}
        self.counts: paddle.Tensor | None = None  # made by the first text row with penalties: _counts

    @property
    def rows(self) -> int:
        return sum(seq.rows for seq in self.sequences.values())

    def __len__(self) -> int:
        return len(self.sequences)

    def add_text(self, key, input_ids: np.ndarray, *, image_mask: np.ndarray | None = None,
                 pixel_values: np.ndarray | None = None, params: SamplingParams = SamplingParams(),
                 seed: int | None = None, max_new_tokens: int = 512,
                 eos_id: int) -> list[StepEvent]:
        """Prefill one understanding prompt; returns the event of its first token."""
        slot = self.reserve_text(len(input_ids), max_new_tokens)
        try:
            logits = self.prefill_text(slot, input_ids, image_mask=image_mask, pixel_values=pixel_values)
        except BaseException:
            self.pool.give_back([slot])
            raise
        return self.start_text(key, slot, len(input_ids), logits, params=params, seed=seed,
                               max_new_tokens=max_new_tokens, eos_id=eos_id)

    # add_text in three parts, so that the prefill may run in another thread (server/engine/worker.py):
    # reserve_text and start_text change the batch and belong to its owner; prefill_text only
    # computes and writes the reserved cache row, which no step reads until start_text.

    def reserve_text(self, length: int, max_new_tokens: int) -> int:
        """Check that a prompt of `length` tokens fits and take its cache row."""
        self._check_fits(length + max_new_tokens - 1)
        return self.pool.take(1)[0]

    def prefill_text(self, slot: int, input_ids: np.ndarray, *, image_mask: np.ndarray | None = None,
                     pixel_values: np.ndarray | None = None) -> paddle.Tensor:
        """Run the prompt into cache row `slot` (from reserve_text); its last position's logits [1, vocab]."""
        return drain(self.prefill_text_pieces(slot, input_ids, image_mask=image_mask, pixel_values=pixel_values))

    def prefill_text_pieces(self, slot: int, input_ids: np.ndarray, *, image_mask: np.ndarray | None = None,
                            pixel_values: np.ndarray | None = None, chunk: int | None = None,
                            vision_blocks: int | None = None) -> Pieces[paddle.Tensor]:
        """prefill_text() in pieces (model/pieces.py): the model's own image encoder in pieces of `vision_blocks`
        blocks (None: encode_images, one piece), then the prompt in chunks of `chunk` tokens (None: one)."""
        embeds = self.model.embed_tokens(from_numpy(np.asarray(input_ids, np.int64)[None]))
        if pixel_values is not None and len(pixel_values):
            pixels = from_numpy(pixel_values)
            if vision_blocks:
                features = yield from self.model.encode_image_pieces(pixels, vision_blocks)
            else:
                features = self.encode_images(pixels)
            embeds = merge_image_features(embeds, features, image_mask)
            if chunk:
                yield
        hidden = yield from self._prefill_pieces(embeds, [slot], chunk)
        return self.text_logits(hidden[:, -1])

    def _prefill_pieces(self, embeds, slots: list[int], chunk: int | None) -> Pieces[paddle.Tensor]:
        """Run prompts [rows, T, hidden] into `slots` from position 0, `chunk` tokens (over all rows) at a time;
        the hidden states of the last chunk."""
        length, rows = embeds.shape[1], len(slots)
        size = max(1, chunk // rows) if chunk else length
        for start in range(0, length, size):
            if start:
                yield
            hidden = self._forward(embeds[:, start:start + size], slots, [start] * rows)
        return hidden

    def start_text(self, key, slot: int, length: int, logits: paddle.Tensor, *,
                   params: SamplingParams = SamplingParams(), seed: int | None = None,
                   max_new_tokens: int = 512, eos_id: int) -> list[StepEvent]:
        """Join the batch with a prefilled row (its logits [1, vocab] from prefill_text); returns the event of
        its first token. Without a seed it draws one."""
        seq = TextSequence(key, slot, length, params, new_seed() if seed is None else seed, max_new_tokens, eos_id)
        if params.penalized:
            self._counts(logits.shape[-1])[slot] = 0
        self.sequences[key] = seq
        return self._accept_text([seq], logits)

    def add_images(self, key, prompt_ids: np.ndarray, *, pad_id: int, n: int, cfg_weight: float = 5.0,
                   params: SamplingParams = SamplingParams(temperature=1.0),
                   seeds: list[int] | None = None) -> list[StepEvent]:
        """Prefill the 2n CFG rows of one text-to-image prompt; returns the first step's event. Image i draws
        with seeds[i] (each drawn when not given)."""
        seeds = checked_seeds(seeds, n)
        slots = self.reserve_images(len(prompt_ids), n)
        try:
            logits = drain(self.prefill_image_pieces(slots, prompt_ids, pad_id=pad_id))
        except BaseException:
            self.pool.give_back(slots)
            raise
        return self.start_images(key, slots, len(prompt_ids), logits, params=params, seeds=seeds,
                                 cfg_weight=cfg_weight)

    # add_images in three parts as add_text (reserve_images, prefill_image_pieces, start_images), so that a
    # runtime may run the prefill in pieces between steps (model/runtime/gpu.py).

    def reserve_images(self, length: int, n: int) -> list[int]:
        """Check that a prompt of `length` tokens fits and take the 2n cache rows of its n images."""
        self._check_fits(length + IMAGE_TOKENS - 1)
        return self.pool.take(2 * n)

    def prefill_image_pieces(self, slots: list[int], prompt_ids: np.ndarray, *, pad_id: int,
                             chunk: int | None = None) -> Pieces[paddle.Tensor]:
        """Run the CFG rows of a prompt into `slots` (from reserve_images), `chunk` tokens at a time (None: one
        piece); the image head's logits of their last position [2n, codebook]."""
        tokens = cfg_prompt_rows(np.asarray(prompt_ids, np.int64), pad_id, len(slots) // 2)
        hidden = yield from self._prefill_pieces(self.model.embed_tokens(from_numpy(tokens)), slots, chunk)
        return self.image_logits(hidden[:, -1])

    def start_images(self, key, slots: list[int], length: int, logits: paddle.Tensor, *,
                     params: SamplingParams = SamplingParams(temperature=1.0), seeds: list[int] | None = None,
                     cfg_weight: float = 5.0) -> list[StepEvent]:
        """Join the batch with prefilled image rows (logits from prefill_image_pieces); the first step's event."""
        seeds = checked_seeds(seeds, len(slots) // 2)
        seq = ImageSequence(key, slots, length, params, seeds, cfg_weight, [[] for _ in seeds])
        self.sequences[key] = seq
        return self._accept_codes([seq], logits)

    def remove(self, key) -> None:
        """Drop a sequence (finished or cancelled) and free its cache rows."""
        seq = self.sequences.pop(key, None)
        if seq is not None:
            self.pool.give_back([seq.slot] if isinstance(seq, TextSequence) else seq.slots)

    def step(self) -> list[StepEvent]:
        """Feed every sequence its last token and sample the next one, in one forward pass."""
        if not self.sequences:
            return []
        order = list(self.sequences.values())
        return self._step_sequences(order)

    def step_each(self) -> tuple[list[StepEvent], dict[Any, BaseException]]:
        """Step sequences one at a time, so that a failure stays with its own sequence."""
        events, failures = [], {}
        for seq in list(self.sequences.values()):
            try:
                events.extend(self._step_sequences([seq]))
            except Exception as error:  # noqa: BLE001 - reported to that request alone
                failures[seq.key] = error
                self.remove(seq.key)
        return events, failures

    def _step_sequences(self, order: list[TextSequence | ImageSequence]) -> list[StepEvent]:
        # Rows in slot order: consecutive slots are attended as one group (model/cpu_attention.py).
        text = sorted((s for s in order if isinstance(s, TextSequence)), key=lambda s: s.slot)
        image = sorted((s for s in order if isinstance(s, ImageSequence)), key=lambda s: s.slots[0])
        parts, slots, starts = [], [], []
        if text:
            ids = np.array([[s.generated[-1]] for s in text], np.int64)
            parts.append(self.model.embed_tokens(from_numpy(ids)))
            for s in text:
                slots.append(s.slot)
                starts.append(s.length)
        if image:
            codes = np.array([[c[-1]] for s in image for c in s.codes for _ in (0, 1)], np.int64)
            parts.append(self.model.embed_image_tokens(from_numpy(codes)))
            for s in image:
                slots.extend(s.slots)
                starts.extend([s.length] * s.rows)
        embeds = parts[0] if len(parts) == 1 else paddle.concat(parts, axis=0)
        hidden = self._forward(embeds, slots, starts)[:, -1]
        events = []
        if text:
            for seq in text:
                seq.length += 1
            events.extend(self._accept_text(text, self.text_logits(hidden[: len(text)])))
        if image:
            for seq in image:
                seq.length += 1
            events.extend(self._accept_codes(image, self.image_logits(hidden[len(text):])))
        return events

    def _forward(self, embeds, slots: list[int], starts: list[int]):
        return self.forward_hidden(embeds, self.cache, np.asarray(slots, np.int64), np.asarray(starts, np.int64))

    def _counts(self, vocab: int) -> paddle.Tensor:
        """[slots, vocab] float32: how often each text row generated each token (for the penalties)."""
        if self.counts is None:
            self.counts = paddle.zeros([self.cache.num_slots, vocab], dtype="float32")
        return self.counts

    def _accept_text(self, text: list[TextSequence], logits: paddle.Tensor) -> list[StepEvent]:
        """Sample the next token of each sequence from its row of logits [len(text), vocab]."""
        params = [seq.params for seq in text]
        rows = RowParams.of(params, uniforms([seq.seed for seq in text], [len(seq.generated) for seq in text]))
        if rows.any_penalty:
            counts = self._counts(logits.shape[-1])
            index = from_numpy(np.array([seq.slot for seq in text], np.int64))
            logits = penalize(logits, paddle.gather(counts, index), rows)
        tokens = sample(logits, rows)
        if rows.any_penalty:
            self.counts = paddle.index_add(counts, index, 0, paddle.nn.functional.one_hot(tokens, counts.shape[-1]))
        events = []
        for seq, token in zip(text, tokens.numpy().tolist()):
            seq.generated.append(token)
            events.append(StepEvent(seq.key, "token", token=token))
            if token == seq.eos_id:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason:
                self.remove(seq.key)
                events.append(StepEvent(seq.key, "text_done", finish_reason=seq.finish_reason))
        return events

    def _accept_codes(self, image: list[ImageSequence], logits: paddle.Tensor) -> list[StepEvent]:
        """Guide and sample the next code of every image of `image` from their rows of logits (conditional,
        unconditional for each image, in order)."""
        weights = np.array([seq.cfg_weight for seq in image for _ in seq.codes], np.float32)[:, None]
        guided = cfg(logits[0::2], logits[1::2], from_numpy(weights))
        rows = RowParams.of([seq.params for seq in image for _ in seq.codes],
                            uniforms([s for seq in image for s in seq.seeds], [seq.step for seq in image for _ in seq.codes]))
        codes = iter(sample(guided, rows).numpy().tolist())
        events = []
        for seq in image:
            for image_codes in seq.codes:
                image_codes.append(next(codes))
            events.append(StepEvent(seq.key, "progress", step=seq.step))
            if seq.step == IMAGE_TOKENS:
                self.remove(seq.key)
                events.append(StepEvent(seq.key, "codes_done", codes=np.array(seq.codes, np.int64)))
        return events

    def _check_fits(self, positions: int) -> None:
        if positions > self.max_len:
            raise ValueError(f"needs {positions} cache positions per row; this batch holds {self.max_len}")


def cfg_prompt_rows(prompt_ids: np.ndarray, pad_id: int, n: int) -> np.ndarray:
    """[2n, L]: even rows the prompt, odd rows with every token but the first and last padded."""
    rows = np.repeat(prompt_ids[None], 2 * n, axis=0)
    rows[1::2, 1:-1] = pad_id
    return rows


def merge_image_features(embeds, features, image_mask):
    """Replace the embeddings at image-placeholder positions by the aligned image features."""
    positions = np.flatnonzero(np.asarray(image_mask).reshape(-1))
    if len(positions) != features.shape[0] * features.shape[1]:
        raise ValueError(f"{len(positions)} image positions in the prompt for "
                         f"{features.shape[0]} x {features.shape[1]} image features")
    flat = embeds.reshape([-1, embeds.shape[-1]])
    flat = paddle.scatter(flat, from_numpy(positions), features.reshape([-1, flat.shape[-1]]).astype(flat.dtype))
    return flat.reshape(embeds.shape)


def checked_seeds(seeds: list[int] | None, n: int) -> list[int]:
    """The seeds of n images: as given (one each), or each drawn."""
    if seeds is None:
        return [new_seed() for _ in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{n} images need {n} seeds, got {len(seeds)}")
    return list(seeds)


def image_seeds(seed: int, n: int) -> list[int]:
    """Image i of a request with `seed` uses seed + i, so n=1 with that seed redraws it."""
    return [(seed + i) % 2**63 for i in range(n)]


def generate_text(model, inputs: list[dict], *, eos_id: int, params: SamplingParams = SamplingParams(),
                  max_new_tokens: int = 512, seeds: list[int | None] | None = None) -> list[list[int]]:
    """Token ids generated for each prompt of a batch (each dict: input_ids, image_mask, pixel_values)."""
    max_len = max(len(x["input_ids"]) for x in inputs) + max_new_tokens
    batch = DecodeBatch(model, slots=len(inputs), max_len=max_len)
    seeds = seeds or [None] * len(inputs)
    out: dict[int, list[int]] = {i: [] for i in range(len(inputs))}
    events = []
    for i, x in enumerate(inputs):
        events += batch.add_text(i, x["input_ids"], image_mask=x.get("image_mask"),
                                 pixel_values=x.get("pixel_values"), params=params,
                                 seed=seeds[i], max_new_tokens=max_new_tokens, eos_id=eos_id)
    while True:
        for event in events:
            if event.kind == "token":
                out[event.key].append(event.token)
        if not batch:
            return [out[i] for i in range(len(inputs))]
        events = batch.step()


def generate_images(model, prompt_ids: np.ndarray, *, pad_id: int, n: int = 1, cfg_weight: float = 5.0,
                    params: SamplingParams = SamplingParams(temperature=1.0), seed: int = 0,
                    on_step=None) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n,576], images [n,384,384,3] uint8) for one prompt."""
    batch = DecodeBatch(model, slots=2 * n, max_len=len(prompt_ids) + IMAGE_TOKENS)
    events = batch.add_images(0, prompt_ids, pad_id=pad_id, n=n, cfg_weight=cfg_weight, params=params,
                              seeds=image_seeds(seed, n))
    while True:
        for event in events:
            if on_step and event.kind == "progress":
                on_step(event.step)
            if event.kind == "codes_done":
                return event.codes, decode_images(model, event.codes)
        events = batch.step()

