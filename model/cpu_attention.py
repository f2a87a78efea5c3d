"""Attention of new tokens over the KV cache, in numpy, straight on the cache's memory (CPU, float32).

Why: on CPU, Paddle's batched matmul over the blocked cache pays per tiny
[1 x head_dim] x [head_dim x block] product, plus a gather copy of every row's blocks;
numpy reads the same cache through zero-copy strided views. Measured with
bench/cpu_attention_bench.py on the 2-core dev box, one Janus-1.3B layer's attention block
(projections included) at 640 cached positions: batch 2 11.6 -> 7.1 ms, batch 8 89 -> 22 ms,
batch 16 160 -> 37 ms. Used by the eager model on CPU (model/llama.py) and by the OpenVINO
engine (model/cpu_engine.py).

The products over the cache use einsum for wide heads and matmul for narrow ones
(EINSUM_MIN_HEAD_DIM); measured on the same box, 8 rows at 640 cached positions: with
head_dim 128 (Janus-1.3B) einsum 6.1 ms against matmul 8.5 ms a layer, with head_dim 16
(janus-tiny) einsum 0.46 ms against matmul 0.20 ms. einsum's inner loop runs along head_dim.

The cache layout is KVCache's: [blocks, slots, kv_heads, block_size, head_dim]. Rows
whose slots are consecutive form a group and are read as one strided view; keys are read
as `full` whole blocks plus the first `rem` positions of the next block, so no row reads
past the group's longest prefix. The softmax runs over all visible keys jointly, its
normalisation applied after the value product.
"""
from __future__ import annotations

import dataclasses

import numpy as np

EINSUM_MIN_HEAD_DIM = 64


@dataclasses.dataclass
class Group:
    """Batch rows with consecutive cache slots. Masks are None where every key is visible."""

    rows: slice  # into the flat [B*T] query rows
    slots: slice
    full: int
    rem: int
    mask_full: np.ndarray | None  # [full, G, 1, 1, T, block_size] additive
    mask_rem: np.ndarray | None  # [G, 1, 1, T, rem] additive


def plan_groups(slots: np.ndarray, positions: np.ndarray, block_size: int) -> list[Group]:
    """Groups for rows `slots` [B] whose new tokens sit at `positions` [B, T]."""
    batch, length = positions.shape
    bs = block_size
    groups = []
    first = 0
    for b in range(1, batch + 1):
        if b < batch and slots[b] == slots[b - 1] + 1:
            continue
        pos = positions[first:b]  # [G, T]
        full, rem = divmod(int(pos.max()) + 1, bs)
        keys = np.arange(full * bs + rem, dtype=np.int64)
        allowed = keys[None, None, :] <= pos[:, :, None]  # [G, T, keys]
        mask_full = mask_rem = None
        if not allowed.all():
            additive = np.where(allowed, np.float32(0.0), np.float32(-np.inf))
            count = b - first
            mask_full = additive[:, :, : full * bs].reshape(count, length, full, bs).transpose(2, 0, 1, 3)
            mask_full = np.ascontiguousarray(mask_full).reshape(full, count, 1, 1, length, bs)
            mask_rem = additive[:, :, full * bs:].reshape(count, 1, 1, length, rem)
        groups.append(Group(slice(first * length, b * length), slice(int(slots[first]), int(slots[b - 1]) + 1),
                            full, rem, mask_full, mask_rem))
        first = b
    return groups


def write_cache(kc: np.ndarray, vc: np.ndarray, where: tuple, k: np.ndarray, v: np.ndarray) -> None:
    """Write new keys and values k/v [N, kv_heads, D] into the cache views kc/vc, in place, at
    where = (block, slot, offset), three [N] index arrays (KVCache's layout, as `attend` reads it)."""
    block, slot, offset = where
    kc[block, slot, :, offset] = k
    vc[block, slot, :, offset] = v


def attend(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, groups: list[Group], *, kv_heads: int, length: int,
           scale: float) -> np.ndarray:
    """q [B*T, heads, D] (batch-major, unscaled) over cache views kc/vc -> [B*T, heads*D] float32."""
    rows_total, heads, d = q.shape
    groups_per_kv = heads // kv_heads
    out = np.empty((rows_total, heads * d), np.float32)
    scale = np.float32(scale)
    wide = d >= EINSUM_MIN_HEAD_DIM
    for g in groups:
        rows = q[g.rows] * scale  # [G*T, heads, D]
        count = rows.shape[0] // length
        qg = rows.reshape(count, length, kv_heads, groups_per_kv, d).transpose(0, 2, 3, 1, 4)
        qg = qg.reshape(count, kv_heads, groups_per_kv * length, d)
        split = (count, kv_heads, groups_per_kv, length)
        top = None
        if g.full:  # whole blocks: [full, G, kv_heads, groups*T, block] from a strided view, no gather
            keys = kc[: g.full, g.slots]
            if wide:
                s_full = np.einsum("gkqd,ngksd->ngkqs", qg, keys)
            else:
                s_full = np.matmul(keys, qg.transpose(0, 1, 3, 2)).transpose(0, 1, 2, 4, 3)
            s_full = s_full.reshape(g.full, *split, s_full.shape[-1])
            if g.mask_full is not None:
                s_full += g.mask_full
            top = s_full.max(axis=(0, 5))
        if g.rem:  # the used head of the last block
            keys = kc[g.full, g.slots, :, : g.rem]
            if wide:
                s_rem = np.einsum("gkqd,gksd->gkqs", qg, keys)
            else:
                s_rem = np.matmul(qg, keys.transpose(0, 1, 3, 2))
            s_rem = s_rem.reshape(*split, g.rem)
            if g.mask_rem is not None:
                s_rem += g.mask_rem
            top = s_rem.max(axis=4) if top is None else np.maximum(top, s_rem.max(axis=4))
        total = np.zeros(split, np.float32)
        att = np.zeros((count, kv_heads, groups_per_kv * length, d), np.float32)
        if g.full:
            e_full = np.exp(s_full - top[None, ..., None])
            total += e_full.sum(axis=(0, 5))
            e_full = e_full.reshape(g.full, count, kv_heads, groups_per_kv * length, -1)
            values = vc[: g.full, g.slots]
            att += np.einsum("ngkqs,ngksd->gkqd", e_full, values) if wide else np.matmul(e_full, values).sum(axis=0)
        if g.rem:
            e_rem = np.exp(s_rem - top[..., None])
            total += e_rem.sum(axis=4)
            e_rem = e_rem.reshape(count, kv_heads, groups_per_kv * length, g.rem)
            values = vc[g.full, g.slots, :, : g.rem]
            att += np.einsum("gkqs,gksd->gkqd", e_rem, values) if wide else np.matmul(e_rem, values)
        att /= total.reshape(count, kv_heads, groups_per_kv * length, 1)
        att = att.reshape(count, kv_heads, groups_per_kv, length, d).transpose(0, 3, 1, 2, 4)
        out[g.rows] = att.reshape(count * length, heads * d)
    return out


def prompt_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float, causal: bool,
                     chunk: int = 64) -> np.ndarray:
    """Attention of a whole prompt over itself: q [B, T, heads, D], k/v [B, T, kv_heads, D] -> [B, T, heads*D].

    Queries go in chunks of `chunk`; with `causal` each chunk reads only the keys up to its
    own end, so about half the scores of the full square are never computed. Measured on the
    2-core dev box against Paddle's matmul + mask + softmax + matmul: janus-tiny's prompt
    (4 heads of 16, 620 tokens) 3.3 ms against 18 ms a layer, Janus-1.3B's (16 heads of 128)
    34 ms against 121 ms, SigLIP-tiny (no mask) 2.3 ms against 3.5 ms.
    """
    batch, length, heads, d = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = np.float32(scale)
    qh = np.ascontiguousarray((q * scale).reshape(batch, length, kv_heads, groups, d).transpose(0, 2, 3, 1, 4))
    kt = np.ascontiguousarray(k.transpose(0, 2, 3, 1))[:, :, None]  # [B, kv, 1, D, T]
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))[:, :, None]  # [B, kv, 1, T, D]
    out = np.empty((batch, kv_heads, groups, length, d), np.float32)
    above = np.triu(np.full((chunk, chunk), -np.inf, np.float32), 1)
    for first in range(0, length, chunk):
        last = min(first + chunk, length)
        end = last if causal else length
        scores = np.matmul(qh[:, :, :, first:last], kt[..., :end])  # [B, kv, groups, rows, end]
        if causal:
            scores[..., first:last] += above[: last - first, : last - first]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        part = np.matmul(scores, vh[..., :end, :])
        part /= total
        out[:, :, :, first:last] = part
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads * d)
