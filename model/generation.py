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

from .tensors import from_numpy

IMAGE_TOKENS = 576  # 24 x 24 codes per 384 x 384 image


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of the token


def penalize(logits: np.ndarray, generated: list[int], params: SamplingParams) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the tokens generated so far (not the prompt's):
    logit[t] - count[t] * frequency_penalty - (count[t] > 0) * presence_penalty. The logits as they
    are when both penalties are 0 or nothing has been generated yet."""
    if not generated or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    tokens, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    out = logits.astype(np.float32, copy=True)
    out[tokens] -= (counts * params.frequency_penalty + params.presence_penalty).astype(np.float32)
    return out


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token from one row of logits; greedy ties go to the lowest id, as argmax does."""
    if params.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = cumulative - probs[order] < params.top_p
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = probs[order[keep]]
        probs = filtered / filtered.sum()
    cdf = np.cumsum(probs)
    draw = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, draw, side="right"), len(cdf) - 1))


def cfg_logits(cond: np.ndarray, uncond: np.ndarray, cfg_weight: float) -> np.ndarray:
    """Classifier-free guidance with the reference's expression."""
    return uncond + cfg_weight * (cond - uncond)


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
    rng: np.random.Generator
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
    rngs: list[np.random.Generator]
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
                 allocate=None):
        """`forward_hidden`, `encode_images`: other implementations of the model's methods of those names
        (model.cpu_engine's, model.cpu_vision's); `allocate`: the cache's buffers (KVCache)."""
        self.model = model
        self.forward_hidden = forward_hidden or model.forward_hidden
        self.encode_images = encode_images or model.encode_images
        self.text_logits, self.image_logits = model.text_logits, model.image_logits  # model/cpu_heads.py's on CPU
        self.max_len = max_len
        self.cache = model.new_cache(slots, max_len, allocate=allocate)
        self.pool = SlotPool(slots)
        self.sequences: dict[Any, TextSequence | ImageSequence] = {}

    @property
    def rows(self) -> int:
        return sum(seq.rows for seq in self.sequences.values())

    def __len__(self) -> int:
        return len(self.sequences)

    def add_text(self, key, input_ids: np.ndarray, *, image_mask: np.ndarray | None = None,
                 pixel_values: np.ndarray | None = None, params: SamplingParams = SamplingParams(),
                 rng: np.random.Generator | None = None, max_new_tokens: int = 512,
                 eos_id: int) -> list[StepEvent]:
        """Prefill one understanding prompt; returns the event of its first token."""
        slot = self.reserve_text(len(input_ids), max_new_tokens)
        try:
            logits = self.prefill_text(slot, input_ids, image_mask=image_mask, pixel_values=pixel_values)
        except BaseException:
            self.pool.give_back([slot])
            raise
        return self.start_text(key, slot, len(input_ids), logits, params=params, rng=rng,
                               max_new_tokens=max_new_tokens, eos_id=eos_id)

    # add_text in three parts, so that the prefill may run in another thread (server/engine/worker.py):
    # reserve_text and start_text change the batch and belong to its owner; prefill_text only
    # computes and writes the reserved cache row, which no step reads until start_text.

    def reserve_text(self, length: int, max_new_tokens: int) -> int:
        """Check that a prompt of `length` tokens fits and take its cache row."""
        self._check_fits(length + max_new_tokens - 1)
        return self.pool.take(1)[0]

    def prefill_text(self, slot: int, input_ids: np.ndarray, *, image_mask: np.ndarray | None = None,
                     pixel_values: np.ndarray | None = None) -> np.ndarray:
        """Run the prompt into cache row `slot` (from reserve_text); its last position's logits [vocab]."""
        embeds = self.model.embed_tokens(from_numpy(np.asarray(input_ids, np.int64)[None]))
        if pixel_values is not None and len(pixel_values):
            features = self.encode_images(from_numpy(pixel_values))
            embeds = merge_image_features(embeds, features, image_mask)
        hidden = self._forward(embeds, [slot], [0])
        return self.text_logits(hidden[:, -1]).numpy()[0]

    def start_text(self, key, slot: int, length: int, logits: np.ndarray, *,
                   params: SamplingParams = SamplingParams(), rng: np.random.Generator | None = None,
                   max_new_tokens: int = 512, eos_id: int) -> list[StepEvent]:
        """Join the batch with a prefilled row; returns the event of its first token."""
        seq = TextSequence(key, slot, length, params, rng or np.random.default_rng(), max_new_tokens, eos_id)
        self.sequences[key] = seq
        return self._accept_text(seq, logits)

    def add_images(self, key, prompt_ids: np.ndarray, *, pad_id: int, n: int, cfg_weight: float = 5.0,
                   params: SamplingParams = SamplingParams(temperature=1.0),
                   rngs: list[np.random.Generator] | None = None) -> list[StepEvent]:
        """Prefill the 2n CFG rows of one text-to-image prompt; returns the first step's event."""
        length = len(prompt_ids)
        self._check_fits(length + IMAGE_TOKENS - 1)
        tokens = cfg_prompt_rows(np.asarray(prompt_ids, np.int64), pad_id, n)
        slots = self.pool.take(2 * n)
        try:
            embeds = self.model.embed_tokens(from_numpy(tokens))
            hidden = self._forward(embeds, slots, [0] * (2 * n))
            logits = self.image_logits(hidden[:, -1]).numpy()
        except BaseException:
            self.pool.give_back(slots)
            raise
        if rngs is None:
            rngs = [np.random.default_rng() for _ in range(n)]
        seq = ImageSequence(key, slots, length, params, rngs, cfg_weight, [[] for _ in range(n)])
        self.sequences[key] = seq
        return self._accept_codes(seq, logits)

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
            logits = self.text_logits(hidden[: len(text)]).numpy()
            for row, seq in enumerate(text):
                seq.length += 1
                events.extend(self._accept_text(seq, logits[row]))
        if image:
            logits = self.image_logits(hidden[len(text):]).numpy()
            row = 0
            for seq in image:
                seq.length += 1
                events.extend(self._accept_codes(seq, logits[row: row + seq.rows]))
                row += seq.rows
        return events

    def _forward(self, embeds, slots: list[int], starts: list[int]):
        return self.forward_hidden(embeds, self.cache, np.asarray(slots, np.int64), np.asarray(starts, np.int64))

    def _accept_text(self, seq: TextSequence, logits: np.ndarray) -> list[StepEvent]:
        token = sample_token(penalize(logits, seq.generated, seq.params), seq.params, seq.rng)
        seq.generated.append(token)
        events = [StepEvent(seq.key, "token", token=token)]
        if token == seq.eos_id:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason:
            self.remove(seq.key)
            events.append(StepEvent(seq.key, "text_done", finish_reason=seq.finish_reason))
        return events

    def _accept_codes(self, seq: ImageSequence, logits: np.ndarray) -> list[StepEvent]:
        for image, codes in enumerate(seq.codes):
            guided = cfg_logits(logits[2 * image], logits[2 * image + 1], seq.cfg_weight)
            codes.append(sample_token(guided, seq.params, seq.rngs[image]))
        events = [StepEvent(seq.key, "progress", step=seq.step)]
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


def image_rngs(seed: int, n: int) -> tuple[list[int], list[np.random.Generator]]:
    """Image i of a request with `seed` uses seed + i, so n=1 with that seed redraws it."""
    seeds = [(seed + i) % 2**63 for i in range(n)]
    return seeds, [np.random.default_rng(s) for s in seeds]


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
                                 rng=np.random.default_rng(seeds[i]), max_new_tokens=max_new_tokens, eos_id=eos_id)
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
    _, rngs = image_rngs(seed, n)
    events = batch.add_images(0, prompt_ids, pad_id=pad_id, n=n, cfg_weight=cfg_weight, params=params, rngs=rngs)
    while True:
        for event in events:
            if on_step and event.kind == "progress":
                on_step(event.step)
            if event.kind == "codes_done":
                return event.codes, decode_images(model, event.codes)
        events = batch.step()

