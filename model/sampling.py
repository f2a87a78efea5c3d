"""Choosing the next token of many rows at once, in Paddle on the rows' device, with one random number per row.

One definition on every device, so that a seed gives the same tokens on CPU and GPU, alone or batched:

- Each row's random number comes from a counter-based generator, Philox4x32-10 (Salmon et al., "Parallel
  random numbers: as easy as 1, 2, 3", SC 2011): its key is the row's seed, its counter the step. It
  depends on nothing else (not on which rows run beside it, nor on how many steps other rows took), and
  the host computes it (`uniforms`) before the step, so the device draws no random numbers of its own.
- `sample` works in float32: penalties, then the temperature, then top-k (every token whose logit is
  at least the k-th largest), then the softmax, then top-p (every token whose probability is at least
  that of the last token of the smallest most-probable prefix holding `top_p` of the mass), then the
  draw: the first token, in id order, whose cumulative probability exceeds u times the kept mass.
  Ties at a cut are kept whole, so the result depends on the values alone, never on how a sort orders
  equal values. Temperature 0 is greedy: the lowest id among the largest logits.
- Classifier-free guidance (`cfg`) is the reference's expression, in float32.

The steps are plain Paddle operations (sort, cumsum, comparisons, sums) that run on CPU, where they
are the reference, and on GPU alike. A filter no row of the batch uses costs no operation.
"""
from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import paddle

from .tensors import from_numpy


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of the token

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def new_seed() -> int:
    """A seed for a request that gave none."""
    return secrets.randbits(63)


# ---- Philox4x32-10, vectorized over rows in numpy

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LOW = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox4x32 of counters [..., 4] under keys [..., 2] (32-bit words, any integer dtype) -> [..., 4] uint32."""
    c = [np.asarray(counter, np.uint64)[..., i] & _LOW for i in range(4)]
    k0, k1 = (np.asarray(key, np.uint64)[..., i] & _LOW for i in range(2))
    shift = np.uint64(32)
    for round_ in range(rounds):
        if round_:
            k0, k1 = (k0 + _W0) & _LOW, (k1 + _W1) & _LOW
        p0, p1 = _M0 * c[0], _M1 * c[2]  # < 2**64: exact in uint64
        c = [(p1 >> shift) ^ c[1] ^ k0, p1 & _LOW, (p0 >> shift) ^ c[3] ^ k1, p0 & _LOW]
    return np.stack(c, axis=-1).astype(np.uint32)


def uniforms(seeds, steps) -> np.ndarray:
    """One float32 in [0, 1) for each (seed, step): Philox4x32-10 keyed by the 64-bit seed, counter (step, 0, 0, 0);
    the first word's top 24 bits."""
    seeds = np.asarray(seeds, np.uint64).reshape(-1)
    steps = np.asarray(steps, np.uint64).reshape(-1)
    counter = np.zeros((len(seeds), 4), np.uint64)
    counter[:, 0] = steps & _LOW
    counter[:, 1] = steps >> np.uint64(32)
    key = np.stack([seeds & _LOW, seeds >> np.uint64(32)], axis=-1)
    words = philox4x32(counter, key)[:, 0]
    return ((words >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)


# ---- the device side

@dataclasses.dataclass
class RowParams:
    """The sampling settings of a batch's rows, as [R] tensors on the logits' device."""

    temperature: paddle.Tensor  # float32
    top_k: paddle.Tensor  # int64, 0: off
    top_p: paddle.Tensor  # float32, 1: off
    presence: paddle.Tensor  # float32
    frequency: paddle.Tensor  # float32
    uniform: paddle.Tensor  # float32 in [0, 1)
    sampled: bool  # some row has a temperature above 0
    top_k_largest: int  # the largest top_k of a sampled row (0: none filters so)
    any_top_p: bool
    any_penalty: bool

    @classmethod
    def of(cls, params: list[SamplingParams], uniform: np.ndarray) -> "RowParams":
        """The rows' settings and random numbers, sent to the device in one copy."""
        packed = np.array([[p.temperature, p.top_k, p.top_p, p.presence_penalty, p.frequency_penalty]
                           for p in params], np.float32).reshape(len(params), 5)
        # top_k travels as float32: exact below 2**24, far above any vocabulary
        packed = np.concatenate([packed, np.asarray(uniform, np.float32).reshape(len(params), 1)], axis=1)
        columns = from_numpy(np.ascontiguousarray(packed.T))
        return cls(columns[0], columns[1].astype("int64"), columns[2], columns[3], columns[4], columns[5],
                   sampled=any(p.temperature > 0 for p in params),
                   top_k_largest=max((p.top_k for p in params if p.temperature > 0), default=0),
                   any_top_p=any(p.temperature > 0 and p.top_p < 1 for p in params),
                   any_penalty=any(p.penalized for p in params))


def cfg(cond: paddle.Tensor, uncond: paddle.Tensor, weight) -> paddle.Tensor:
    """Classifier-free guidance, the reference's expression, in float32; `weight` a number or [R, 1]."""
    cond, uncond = cond.astype("float32"), uncond.astype("float32")
    return uncond + weight * (cond - uncond)


def penalize(logits: paddle.Tensor, counts: paddle.Tensor, rows: RowParams) -> paddle.Tensor:
    """OpenAI's presence and frequency penalties: logit[t] - count[t] * frequency - (count[t] > 0) * presence,
    with counts [R, V] the times each token was generated so far (not the prompt's)."""
    if not rows.any_penalty:
        return logits
    seen = (counts > 0).astype("float32")
    return logits - counts * rows.frequency.unsqueeze(-1) - seen * rows.presence.unsqueeze(-1)


def sample(logits: paddle.Tensor, rows: RowParams) -> paddle.Tensor:
    """[R, V] logits (penalized already) -> [R] int64 token ids, by the module's definition."""
    logits = logits.astype("float32")
    greedy = paddle.argmax(logits, axis=-1)
    if not rows.sampled:
        return greedy
    vocab = logits.shape[-1]
    hot = rows.temperature > 0
    z = logits / paddle.where(hot, rows.temperature, paddle.ones_like(rows.temperature)).unsqueeze(-1)
    if 0 < rows.top_k_largest:
        on = hot & (rows.top_k > 0) & (rows.top_k < vocab)
        largest = min(rows.top_k_largest, vocab)
        values = paddle.topk(z, largest, axis=-1)[0]
        kth = paddle.take_along_axis(values, (paddle.clip(rows.top_k, 1, largest) - 1).unsqueeze(-1), axis=-1)
        cut = on.unsqueeze(-1) & (z < kth)
        z = paddle.where(cut, paddle.full_like(z, -np.inf), z)
    probs = paddle.nn.functional.softmax(z, axis=-1)
    if rows.any_top_p:
        ordered = paddle.sort(probs, axis=-1, descending=True)
        before = paddle.cumsum(ordered, axis=-1) - ordered  # mass of the more probable tokens
        kept = paddle.sum((before < rows.top_p.unsqueeze(-1)).astype("int64"), axis=-1, keepdim=True)
        floor = paddle.take_along_axis(ordered, paddle.clip(kept - 1, 0, vocab - 1), axis=-1)
        cut = (hot & (rows.top_p < 1)).unsqueeze(-1) & (probs < floor)
        probs = paddle.where(cut, paddle.zeros_like(probs), probs)
    cdf = paddle.cumsum(probs, axis=-1)
    draw = rows.uniform.unsqueeze(-1) * cdf[:, -1:]
    index = paddle.sum((cdf <= draw).astype("int64"), axis=-1)
    # u * mass rounds up to the mass only by float error: then the last token with any probability
    last = vocab - 1 - paddle.argmax(paddle.flip((probs > 0).astype("int64"), axis=[-1]), axis=-1)
    index = paddle.minimum(index, last)
    return paddle.where(hot, index, greedy)


def reference_draw(logits: np.ndarray, params: SamplingParams, u: float, token: int, slack: float = 1e-5) -> bool:
    """Whether `token` is what the definition draws from one row of `logits` with random number `u`, computed
    in float64: a token the filters keep, whose interval of the cumulative probability holds u (within
    `slack`, for float32's rounding of the sums on the device)."""
    logits = np.asarray(logits, np.float64)
    if params.temperature <= 0:
        return token == int(np.argmax(logits))
    z = logits / params.temperature
    if 0 < params.top_k < len(z):
        z = np.where(z < np.sort(z)[-params.top_k], -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if params.top_p < 1:
        ordered = np.sort(probs)[::-1]
        before = np.cumsum(ordered) - ordered
        probs = np.where(probs < ordered[max(int((before < params.top_p).sum()) - 1, 0)], 0.0, probs)
    probs /= probs.sum()
    if not 0 <= token < len(probs) or probs[token] == 0:
        return False
    high = float(np.cumsum(probs)[token])
    return high - probs[token] - slack <= u <= high + slack
