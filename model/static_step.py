"""The language model's decode step with static shapes: what the GPU runtime runs (model/runtime/gpu.py).

The reference forward (model/llama.py) builds every step's rotary tables, cache addresses and mask on
the host and sends each over (6-7 copies a step), and reads the cache in blocks. Here:

- The cache is one buffer per layer for keys and one for values, [slots + 1, max_len, kv_heads,
  head_dim]: a row's positions are contiguous; the last slot is a scratch row that padding rows write.
- A decode step (one new token per row) runs at a bucket of rows (1, 2, 4, ...: padded up) and of
  cached length (a multiple of LENGTH_BUCKET): its shapes depend on the bucket alone, so that a
  CUDA graph captured for a bucket can replay it. Its inputs (each row's cache slot and position)
  reach the device in one copy into a buffer kept per bucket; the rotary factors are gathered from
  tables on the device and the mask is built there. Inside the step nothing is read back and no
  tensor is made from host data.
- Per layer: RMSNorm, one QKV product, rotary (4 operations), two cache writes, a gather of the rows'
  cached keys and values, scaled_dot_product_attention, the output product, RMSNorm, the gate/up
  product, swiglu, the down product. On a GPU the norms are Paddle's fused kernel (switch `fused`);
  on CPU, where that kernel is not safe to call, the reference's six operations.
- A prefill (a prompt, or a chunk of one from a later position) runs through the same layers at its
  own shape, causal, and writes its keys and values into the rows' cache slots. It is not captured.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from .llama import cache_addresses, rotary_cos_sin
from .tensors import from_numpy

LENGTH_BUCKET = 128
CAPTURED_AT_START = 64  # row buckets up to this are captured at start; larger ones on first use


def row_bucket(rows: int) -> int:
    """The rows a step of `rows` runs at: the next power of two."""
    if rows < 1:
        raise ValueError(f"a step needs at least one row, got {rows}")
    return 1 << (rows - 1).bit_length()


class StaticCache:
    """Keys and values of `num_slots` rows of up to `max_len` positions. Per layer one buffer each, laid out
    [num_slots + 1, kv_heads, max_len, head_dim] (the last slot: scratch for padding rows) and kept flat,
    [(num_slots + 1) * kv_heads * max_len, head_dim]: a step writes and gathers rows of it by one index."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: str):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {num_slots} x {max_len}")
        self.num_slots, self.max_len, self.kv_heads = num_slots, max_len, kv_heads
        shape = [(num_slots + 1) * kv_heads * max_len, head_dim]
        self.k = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    @property
    def scratch(self) -> int:
        return self.num_slots

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.k + self.v)

    def view(self, tensor: paddle.Tensor):
        """A layer's buffer as [num_slots + 1, kv_heads, max_len, head_dim] (numpy, for tests)."""
        return tensor.numpy().reshape(self.num_slots + 1, self.kv_heads, self.max_len, -1)


class StaticStep:
    """Janus's language model layers run as a static-shape decode step over a StaticCache.

    `forward_hidden(embeds, cache, slots, start)` has the reference's contract (model.forward_hidden): a
    decode step when embeds is [B, 1, hidden], a prefill when every row starts at position 0."""

    def __init__(self, lm, dtype: str, *, fused: bool | None = None):
        """`lm`: the model's LlamaModel (model.language_model.model), whose weights the step uses as they are;
        `dtype`: theirs; `fused`: Paddle's fused RMSNorm (default: off CPU, where it is not safe to call)."""
        self.config = lm.config
        self.layers, self.final_norm = lm.layers, lm.norm
        self.dtype = dtype
        self.fused = (not paddle.get_device().startswith("cpu")) if fused is None else fused
        self.heads, self.kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.head_dim = self.config.head_dim
        self.inv_freq = lm.inv_freq
        self.tables: dict[int, tuple] = {}  # max_len -> rotary factors and key positions (_tables)
        self.buffers: dict[int, paddle.Tensor] = {}  # row bucket -> [2, bucket] int64: slots, positions
        self.runner = self.step  # what runs a decode step's static part (model/graphs.py replays it from graphs)

    # ---- the cache

    def new_cache(self, slots: int, max_len: int, allocate=None) -> StaticCache:
        """DecodeBatch's hook: a cache of `slots` rows (`allocate` is the reference cache's, not used here)."""
        c = self.config
        self._tables(max_len)
        return StaticCache(c.num_hidden_layers, slots, max_len, c.num_key_value_heads, c.head_dim, self.dtype)

    def _tables(self, max_len: int):
        """(cos, sin with its first half negated) [max_len, heads + kv_heads, head_dim], the query heads' scaled by
        1/sqrt(head_dim) (the attention's scale, folded in); the key positions 0..max_len-1; the kv heads
        0..kv_heads-1; the mask's two values (0, -inf): made once, so that a step makes no tensor."""
        if max_len not in self.tables:
            cos, sin = rotary_cos_sin(np.arange(max_len, dtype=np.int64), self.inv_freq)
            sin[..., : sin.shape[-1] // 2] *= -1
            scale = np.ones((1, self.heads + self.kv_heads, 1), np.float32)
            scale[:, : self.heads] = np.float32(1.0 / math.sqrt(self.head_dim))
            self.tables[max_len] = (from_numpy(cos[:, None, :] * scale).astype(self.dtype),
                                    from_numpy(sin[:, None, :] * scale).astype(self.dtype),
                                    from_numpy(np.arange(max_len, dtype=np.int64)),
                                    from_numpy(np.arange(self.kv_heads, dtype=np.int64)[None]),  # [1, kv_heads]
                                    from_numpy(np.array([0.0, -np.inf], np.float32)).astype(self.dtype))
        return self.tables[max_len]

    # ---- the step

    @paddle.no_grad()
    def forward_hidden(self, embeds, cache: StaticCache, slots, start) -> paddle.Tensor:
        embeds = embeds if isinstance(embeds, paddle.Tensor) else from_numpy(np.asarray(embeds, np.float32))
        embeds = embeds.astype(self.dtype) if embeds.dtype != getattr(paddle, self.dtype) else embeds
        slots, start, positions = cache_addresses(cache, slots, start, embeds.shape[0], embeds.shape[1])
        if embeds.shape[1] == 1:
            return self.decode(embeds, cache, slots, start)
        return self.prefill(embeds, cache, slots, positions)

    def decode(self, embeds: paddle.Tensor, cache: StaticCache, slots: np.ndarray, positions: np.ndarray) -> paddle.Tensor:
        """One new token per row: [B, 1, hidden] -> [B, 1, hidden], run at the row and length buckets."""
        batch = embeds.shape[0]
        bucket = row_bucket(batch)
        length = min(-(-(int(positions.max()) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET, cache.max_len)
        index = np.empty((2, bucket), np.int64)
        index[0, :batch], index[0, batch:] = slots, cache.scratch
        index[1, :batch], index[1, batch:] = positions, 0
        buffer = self.index_buffer(bucket)
        buffer.set_value(index)  # the step's one host-to-device copy, in place
        x = embeds if batch == bucket else paddle.concat(
            [embeds, paddle.zeros([bucket - batch, 1, embeds.shape[2]], dtype=embeds.dtype)])
        return self.runner(x, cache, buffer, length)[:batch]

    def index_buffer(self, bucket: int) -> paddle.Tensor:
        """The [2, bucket] int64 buffer (slots, positions) a step of `bucket` rows reads: made once, refilled."""
        if bucket not in self.buffers:
            self.buffers[bucket] = paddle.zeros([2, bucket], dtype="int64")
        return self.buffers[bucket]

    def length_buckets(self, max_len: int) -> list[int]:
        """Every cached length a decode step runs at with a cache of `max_len` positions."""
        return sorted({min(length, max_len) for length in range(LENGTH_BUCKET, max_len + LENGTH_BUCKET, LENGTH_BUCKET)})

    def step(self, x: paddle.Tensor, cache: StaticCache, index: paddle.Tensor, length: int) -> paddle.Tensor:
        """The captured part: x [bucket, 1, hidden] at index [2, bucket] (slots, positions), keys up to `length`."""
        cos_table, sin_table, key_positions, kv_head_ids, mask_values = self._tables(cache.max_len)
        slots, positions = index[0], index[1]
        bucket, kv_heads, max_len = x.shape[0], self.kv_heads, cache.max_len
        cos = paddle.index_select(cos_table, positions).unsqueeze(1)  # [bucket, 1, heads + kv_heads, head_dim]
        sin = paddle.index_select(sin_table, positions).unsqueeze(1)
        visible = key_positions[:length].unsqueeze(0) <= positions.unsqueeze(1)  # [bucket, length]
        mask = paddle.where(visible, mask_values[0], mask_values[1]).reshape([bucket, 1, 1, length])
        # rows of the flat cache: (slot * kv_heads + head) * max_len + position
        heads = (slots.unsqueeze(1) * kv_heads + kv_head_ids) * max_len
        write = (heads + positions.unsqueeze(1)).reshape([-1])  # [bucket * kv_heads]
        read = (heads.unsqueeze(2) + key_positions[:length].reshape([1, 1, length])).reshape([-1])

        def attention(q, k, v, k_cache, v_cache):
            paddle.index_put_(k_cache, (write,), k.reshape([bucket * kv_heads, self.head_dim]))
            paddle.index_put_(v_cache, (write,), v.reshape([bucket * kv_heads, self.head_dim]))
            shape = [bucket, kv_heads, length, self.head_dim]
            keys = paddle.index_select(k_cache, read).reshape(shape)
            values = paddle.index_select(v_cache, read).reshape(shape)
            # [bucket, kv_heads, groups, head_dim]: with one new token, the same memory order as q's
            q = q.reshape([bucket, kv_heads, self.heads // kv_heads, self.head_dim])
            scores = paddle.matmul(q, keys, transpose_y=True) + mask  # q carries the 1/sqrt(head_dim)
            return paddle.matmul(F.softmax(scores, axis=-1), values)

        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x = self.layer(layer, x, cos, sin, k_cache, v_cache, attention)
        return self.norm(self.final_norm, x)

    def prefill(self, embeds: paddle.Tensor, cache: StaticCache, slots: np.ndarray, positions: np.ndarray) -> paddle.Tensor:
        """Prompts, or chunks of them, [B, T, hidden] at positions [B, T], causal; their keys and values go to
        `slots`. From position 0 each attends to itself alone; a later chunk also to what its row cached."""
        length = embeds.shape[1]
        kv_heads, groups, max_len, head_dim = self.kv_heads, self.heads // self.kv_heads, cache.max_len, self.head_dim
        cos_table, sin_table = self._tables(max_len)[:2]
        index = from_numpy(positions.reshape(-1))
        shape = [len(slots), length, self.heads + kv_heads, head_dim]
        cos, sin = paddle.index_select(cos_table, index).reshape(shape), paddle.index_select(sin_table, index).reshape(shape)
        heads = (slots[:, None, None] * kv_heads + np.arange(kv_heads)[None, :, None]) * max_len  # [B, kv_heads, 1]
        write = from_numpy((heads + positions[:, None, :]).reshape(-1).astype(np.int64))
        fresh = not positions[:, 0].any()
        if not fresh:
            seen = int(positions.max()) + 1
            read = from_numpy((heads + np.arange(seen)[None, None, :]).reshape(-1).astype(np.int64))
            allowed = np.arange(seen)[None, None, :] <= positions[:, :, None]  # [B, T, seen]
            mask = from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None, None]).astype(self.dtype)

        def attention(q, k, v, k_cache, v_cache):
            for tensor, target in ((k, k_cache), (v, v_cache)):
                paddle.index_put_(target, (write,), tensor.transpose([0, 2, 1, 3]).reshape([-1, head_dim]))
            if fresh:
                if groups > 1:
                    k, v = paddle.repeat_interleave(k, groups, axis=2), paddle.repeat_interleave(v, groups, axis=2)
                # q carries the 1/sqrt(head_dim) already; the kernel applies its own
                return F.scaled_dot_product_attention(q * math.sqrt(head_dim), k, v, is_causal=True, training=False)
            batch = q.shape[0]
            keys = paddle.index_select(k_cache, read).reshape([batch, kv_heads, seen, head_dim])
            values = paddle.index_select(v_cache, read).reshape([batch, kv_heads, seen, head_dim])
            q = q.transpose([0, 2, 1, 3]).reshape([batch, kv_heads, groups * length, head_dim])
            scores = paddle.matmul(q, keys, transpose_y=True).reshape([batch, kv_heads, groups, length, seen]) + mask
            probs = F.softmax(scores, axis=-1).reshape([batch, kv_heads, groups * length, seen])
            out = paddle.matmul(probs, values).reshape([batch, self.heads, length, head_dim])
            return out.transpose([0, 2, 1, 3])

        x = embeds
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x = self.layer(layer, x, cos, sin, k_cache, v_cache, attention)
        return self.norm(self.final_norm, x)

    # ---- one layer

    def layer(self, layer, x, cos, sin, k_cache, v_cache, attention) -> paddle.Tensor:
        batch, length = x.shape[0], x.shape[1]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        attn = layer.self_attn
        qkv = paddle.matmul(self.norm(layer.input_layernorm, x), attn.qkv_proj.weight)
        qk, v = paddle.split(qkv.reshape([batch, length, heads + 2 * kv_heads, head_dim]), [heads + kv_heads, kv_heads],
                             axis=2)
        qk = qk * cos + paddle.roll(qk, head_dim // 2, axis=-1) * sin
        q, k = paddle.split(qk, [heads, kv_heads], axis=2)
        out = attention(q, k, v, k_cache, v_cache).reshape([batch, length, heads * head_dim])
        x = x + paddle.matmul(out, attn.o_proj.weight)
        mlp = layer.mlp
        up = F.swiglu(paddle.matmul(self.norm(layer.post_attention_layernorm, x), mlp.gate_up_proj.weight))
        return x + paddle.matmul(up, mlp.down_proj.weight)

    def norm(self, layer, x) -> paddle.Tensor:
        """RMSNorm: Paddle's fused kernel where `fused` (GPU), else the reference's operations."""
        if self.fused:
            return F.rms_norm(x, [x.shape[-1]], layer.weight, layer.eps)[0]
        return layer(x)
