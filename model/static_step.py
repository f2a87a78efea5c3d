"""The language model's decode step with static shapes: what the GPU runtime runs (model/runtime/gpu.py).

The reference forward (model/llama.py) builds every step's rotary tables, cache addresses and mask on
the host and sends each over (6-7 copies a step), and reads the cache in blocks. Here:

- The cache is one buffer per layer for keys and one for values, [slots + 1, max_len, kv_heads,
  head_dim]: a row's positions are contiguous, and a position's heads; the last slot is a scratch row
  that padding rows write.
- A decode step (one new token per row) runs at a bucket of rows (1, 2, 4, ...: padded up) and, with
  gathered attention, of cached length (a multiple of LENGTH_BUCKET): its shapes depend on the bucket
  alone, so that a CUDA graph captured for a bucket can replay it. Its inputs (each row's cache slot
  and position, its place in the step, its run of the cache: `pack`) reach the device in one copy
  into a buffer kept per bucket; the rotary factors are gathered from tables on the device and the
  mask is built there. Inside the step nothing is read back and no tensor is made from host data.
- Per layer: RMSNorm, one QKV product, rotary, two cache writes, a gather of the rows' cached keys and
  values, scaled_dot_product_attention, the output product, RMSNorm, the gate/up product, swiglu, the
  down product. On a GPU, attention is one flash-attention (or memory-efficient) kernel that takes this
  [batch, positions, heads, head_dim] layout as it is and keeps scores and softmax in float32. On CPU
  Paddle composes it of strided transposes and matmuls, which make the step slower there than the
  eager one (janus-server check shows both); a CPU never serves with it (model/runtime/cpu.py).
- `fused` (a GPU's; never on CPU, where Paddle's fused kernels are missing or not safe to call): each
  residual addition and the RMSNorm after it are Paddle's fused_rms_norm (one kernel instead of seven
  operations), the rotary embedding its fused_rotary_position_embedding (one kernel for q and k
  instead of six operations). The runtime checks the result against the reference
  on the device before it serves, and runs unfused otherwise (model/runtime/gpu.py).
- `in_place` (a GPU's, in bfloat16 or float16; checked at start like `fused`): a decode step's attention
  reads the cache where it lies, with no gathered copy. Paddle's varlen flash attention
  (flash_attn_unpadded) takes the flat cache as the packed keys and values, with each row's cached run
  [slot * max_len, slot * max_len + position] a sequence of one query, and the gap before it a sequence
  of none. Sequences must follow each other through the keys, so that the step runs its rows in slot
  order: it reorders them on the way in and back on the way out. Padding rows each attend to the one
  key they write in the scratch slot. A step then reads every cached key once, and one graph per row
  bucket serves every cached length.
- A prefill (a prompt, or a chunk of one from a later position) runs through the same layers at its
  own shape, causal, and writes its keys and values into the rows' cache slots. It is not captured.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from .llama import cache_addresses, rotary_cos_sin
from .tensors import from_numpy

LENGTH_BUCKET = 128
IN_PLACE_DTYPES = ("bfloat16", "float16")  # what Paddle's flash_attn_unpadded takes
INDEX_FIELDS = 4  # a step's index: slots, positions, order and inverse, each one per row; then the key runs
CAPTURED_AT_START = 64  # row buckets up to this are captured at start; larger ones on first use


def row_bucket(rows: int) -> int:
    """The rows a step of `rows` runs at: the next power of two."""
    if rows < 1:
        raise ValueError(f"a step needs at least one row, got {rows}")
    return 1 << (rows - 1).bit_length()


class StaticCache:
    """Keys and values of `num_slots` rows of up to `max_len` positions. Per layer one buffer each, laid out
    [num_slots + 1, max_len, kv_heads, head_dim] (the last slot: scratch for padding rows) and kept flat over slots
    and positions, [(num_slots + 1) * max_len, kv_heads, head_dim]: a step writes and gathers positions (every
    head at once) by one index."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: str):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {num_slots} x {max_len}")
        self.num_slots, self.max_len, self.kv_heads = num_slots, max_len, kv_heads
        shape = [(num_slots + 1) * max_len, kv_heads, head_dim]
        self.k = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]

    @property
    def scratch(self) -> int:
        return self.num_slots

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.k + self.v)

    def view(self, tensor: paddle.Tensor):
        """A layer's buffer as [num_slots + 1, max_len, kv_heads, head_dim] (numpy, for tests)."""
        return tensor.numpy().reshape(self.num_slots + 1, self.max_len, self.kv_heads, -1)


class StaticStep:
    """Janus's language model layers run as a static-shape decode step over a StaticCache.

    `forward_hidden(embeds, cache, slots, start)` has the reference's contract (model.forward_hidden): a
    decode step when embeds is [B, 1, hidden], a prefill when every row starts at position 0."""

    def __init__(self, lm, dtype: str, *, fused: bool | None = None, in_place: bool | None = None):
        """`lm`: the model's LlamaModel (model.language_model.model), whose weights the step uses as they are;
        `dtype`: theirs; `fused`: Paddle's fused RMSNorm and rotary kernels (default: off CPU, where they are
        missing or not safe to call); `in_place`: decode attention by varlen flash attention over the cache as it
        lies (default: off CPU in bfloat16 and float16, the only dtypes the kernel takes)."""
        self.config = lm.config
        self.layers, self.final_norm = lm.layers, lm.norm
        self.dtype = dtype
        on_gpu = not paddle.get_device().startswith("cpu")
        self.fused = on_gpu if fused is None else fused
        self.in_place = (on_gpu and dtype in IN_PLACE_DTYPES) if in_place is None else in_place
        self.heads, self.kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.head_dim = self.config.head_dim
        self.inv_freq = lm.inv_freq
        self.tables: dict[int, tuple] = {}  # max_len -> rotary factors and key positions (_tables)
        self.buffers: dict[int, paddle.Tensor] = {}  # row bucket -> its index (pack), int64 on the device
        self.query_runs: dict[int, paddle.Tensor] = {}  # row bucket -> cu_seqlens_q of in-place attention
        self.runner = self.step  # what runs a decode step's static part (model/graphs.py replays it from graphs)

    # ---- the cache

    def new_cache(self, slots: int, max_len: int, allocate=None) -> StaticCache:
        """DecodeBatch's hook: a cache of `slots` rows (`allocate` is the reference cache's, not used here)."""
        c = self.config
        self._tables(max_len)
        return StaticCache(c.num_hidden_layers, slots, max_len, c.num_key_value_heads, c.head_dim, self.dtype)

    def _tables(self, max_len: int):
        """cos and sin [max_len, 1, head_dim] (unfused: sin's first half negated, so that rotating is
        x * cos + roll(x) * sin; fused: [1, max_len, 1, head_dim] as the fused kernel takes them), the key
        positions 0..max_len-1 and the mask's two values (0, -inf): made once, so that a step makes no tensor."""
        if max_len not in self.tables:
            cos, sin = rotary_cos_sin(np.arange(max_len, dtype=np.int64), self.inv_freq)
            if self.fused:
                cos, sin = cos[None, :, None, :], sin[None, :, None, :]
            else:
                sin[..., : sin.shape[-1] // 2] *= -1
                cos, sin = cos[:, None, :], sin[:, None, :]
            self.tables[max_len] = (from_numpy(np.ascontiguousarray(cos)).astype(self.dtype),
                                    from_numpy(np.ascontiguousarray(sin)).astype(self.dtype),
                                    from_numpy(np.arange(max_len, dtype=np.int64)),
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
        length = cache.max_len if self.in_place else \
            min(-(-(int(positions.max()) + 1) // LENGTH_BUCKET) * LENGTH_BUCKET, cache.max_len)  # length_buckets
        buffer = self.load_index(cache, bucket, slots, positions)
        x = embeds if batch == bucket else paddle.concat(
            [embeds, paddle.zeros([bucket - batch, 1, embeds.shape[2]], dtype=embeds.dtype)])
        return self.runner(x, cache, buffer, length)[:batch]

    def pack(self, cache: StaticCache, bucket: int, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A step's index, [INDEX_FIELDS * bucket + 2 * bucket + 1] int64, for rows at `slots` and `positions` (in
        the batch's order) padded up to `bucket` rows: the step's rows' slots and positions; order (the step's row k
        is the batch's row order[k]) and inverse (the batch's row i is the step's row inverse[i]); then the key runs
        of in-place attention (cu_seqlens_k): 0, then each step row's [first, last + 1) in the flat cache.
        Padding rows come last, in the scratch slot: the j-th at position j, its run that one key (so that a
        padding row computes what a row does: the graphs' check at start runs on padding rows alone); past the
        scratch slot's length, empty runs. In place, the step's rows are in slot order, so that the runs follow
        each other; else in the batch's."""
        batch, max_len = len(slots), cache.max_len
        order = np.argsort(slots, kind="stable") if self.in_place else np.arange(batch)
        order = np.concatenate([order, np.arange(batch, bucket)]).astype(np.int64)
        inverse = np.empty(bucket, np.int64)
        inverse[order] = np.arange(bucket)
        rows = np.asarray(slots, np.int64)[order[:batch]], np.asarray(positions, np.int64)[order[:batch]]
        padding = np.arange(bucket - batch)
        step_slots = np.concatenate([rows[0], np.full(bucket - batch, cache.scratch)])
        step_positions = np.concatenate([rows[1], np.minimum(padding, max_len - 1)])
        first = step_slots * max_len
        starts = first + np.concatenate([np.zeros(batch, np.int64), np.minimum(padding, max_len)])
        ends = first + np.concatenate([rows[1] + 1, np.minimum(padding + 1, max_len)])
        runs = np.stack([starts, ends], axis=1).reshape(-1)
        return np.concatenate([step_slots, step_positions, order, inverse, [0], runs]).astype(np.int64)

    def load_index(self, cache: StaticCache, bucket: int, slots, positions) -> paddle.Tensor:
        """The bucket's index buffer, refilled in place with pack(): the step's one host-to-device copy."""
        buffer = self.index_buffer(bucket)
        buffer.set_value(self.pack(cache, bucket, slots, positions))
        return buffer

    def index_buffer(self, bucket: int) -> paddle.Tensor:
        """The index (pack) a step of `bucket` rows reads: made once, refilled; with the query runs of in-place
        attention, which never change (cu_seqlens_q: each row's gap has no query, its run one)."""
        if bucket not in self.buffers:
            self.buffers[bucket] = paddle.zeros([INDEX_FIELDS * bucket + 2 * bucket + 1], dtype="int64")
            ends = (np.arange(2 * bucket) + 1) // 2  # after row k's gap, k queries; after its run, k + 1
            self.query_runs[bucket] = from_numpy(np.concatenate([[0], ends]).astype(np.int32))
        return self.buffers[bucket]

    def length_buckets(self, max_len: int) -> list[int]:
        """Every cached length a decode step runs at with a cache of `max_len` positions (in place: one, since
        attention reads each row's own run whatever its length)."""
        if self.in_place:
            return [max_len]
        return sorted({min(length, max_len) for length in range(LENGTH_BUCKET, max_len + LENGTH_BUCKET, LENGTH_BUCKET)})

    def step(self, x: paddle.Tensor, cache: StaticCache, index: paddle.Tensor, length: int) -> paddle.Tensor:
        """The captured part: x [bucket, 1, hidden] (the batch's rows, padded) at `index` (pack), keys up to
        `length`."""
        bucket = x.shape[0]
        slots, positions = index[:bucket], index[bucket:2 * bucket]
        rotate = self.rotation(cache.max_len, positions.unsqueeze(1))
        first = (slots * cache.max_len).unsqueeze(1)  # each row's first position in the flat cache
        write = first + positions.unsqueeze(1)  # [bucket, 1]: where k [bucket, 1, kv_heads, head_dim] goes
        if self.in_place:  # rows in slot order in, the batch's order out
            runs = index[INDEX_FIELDS * bucket:].astype("int32")
            attention = self.cache_attention(write, runs=(self.query_runs[bucket], runs, cache.max_len))
            out = self.run_layers(paddle.index_select(x, index[2 * bucket:3 * bucket]), rotate, cache, attention)
            return paddle.index_select(out, index[3 * bucket:4 * bucket])
        key_positions, mask_values = self._tables(cache.max_len)[2:]
        visible = key_positions[:length].unsqueeze(0) <= positions.unsqueeze(1)  # [bucket, length]
        mask = paddle.where(visible, mask_values[0], mask_values[1]).reshape([bucket, 1, 1, length])
        read = (first + key_positions[:length].unsqueeze(0)).reshape([-1])  # [bucket * length]
        shape = [bucket, length, self.kv_heads, self.head_dim]
        return self.run_layers(x, rotate, cache, self.cache_attention(write, read, shape, mask))

    def prefill(self, embeds: paddle.Tensor, cache: StaticCache, slots: np.ndarray, positions: np.ndarray) -> paddle.Tensor:
        """Prompts, or chunks of them, [B, T, hidden] at positions [B, T], causal; their keys and values go to
        `slots`. From position 0 each attends to itself alone; a later chunk also to what its row cached."""
        max_len = cache.max_len
        rotate = self.rotation(max_len, from_numpy(positions))
        first = slots[:, None] * max_len
        write = from_numpy(first + positions)  # [B, T]
        if not positions[:, 0].any():  # fresh prompts: each attends to its own keys alone
            return self.run_layers(embeds, rotate, cache, self.cache_attention(write))
        seen = int(positions.max()) + 1
        read = from_numpy((first + np.arange(seen)[None, :]).reshape(-1))  # [B * seen]
        shape = [len(slots), seen, self.kv_heads, self.head_dim]
        allowed = np.arange(seen)[None, None, :] <= positions[:, :, None]  # [B, T, seen]
        mask = from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]).astype(self.dtype)
        return self.run_layers(embeds, rotate, cache, self.cache_attention(write, read, shape, mask))

    def cache_attention(self, write, read=None, shape=None, mask=None, runs=None):
        """attention(q, k, v, k_cache, v_cache) for the layers: k and v written to the cache rows `write`, then q
        attends to the rows `read` (gathered as `shape`) under `mask`; without `read`, causally to k and v alone;
        with `runs` (cu_seqlens_q, cu_seqlens_k, max_len), one query a row to its run of the cache where it lies."""
        if runs is not None:
            import paddle.nn.functional.flash_attention as flash

            query_runs, key_runs, max_len = runs
            scale = self.head_dim ** -0.5

        def attention(q, k, v, k_cache, v_cache):
            paddle.index_put_(k_cache, (write,), k)
            paddle.index_put_(v_cache, (write,), v)
            if runs is not None:
                return flash.flash_attn_unpadded(q.reshape([-1, self.heads, self.head_dim]), k_cache, v_cache,
                                                 query_runs, key_runs, 1, max_len, scale, training=False)[0]
            if read is None:
                return self.attend(q, k, v, causal=True)
            keys = paddle.index_select(k_cache, read).reshape(shape)
            return self.attend(q, keys, paddle.index_select(v_cache, read).reshape(shape), mask=mask)

        return attention

    # ---- one layer

    def run_layers(self, x, rotate, cache: StaticCache, attention) -> paddle.Tensor:
        """Every layer, then the final norm. Each layer leaves its MLP's output to be added to the residual stream
        by the next norm: with fused kernels, one operation adds and normalizes."""
        delta = None
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x, delta = self.layer(layer, x, delta, rotate, k_cache, v_cache, attention)
        return self.add_norm(x, delta, self.final_norm)[0]

    def layer(self, layer, x, delta, rotate, k_cache, v_cache, attention) -> tuple[paddle.Tensor, paddle.Tensor]:
        """One decoder layer over the residual stream x plus the previous layer's `delta` (None: none): the new
        stream, and this layer's MLP output to add to it."""
        batch, length = x.shape[0], x.shape[1]
        attn = layer.self_attn
        normed, x = self.add_norm(x, delta, layer.input_layernorm)
        qkv = paddle.matmul(normed, attn.qkv_proj.weight)
        q, k, v = rotate(qkv.reshape([batch, length, self.heads + 2 * self.kv_heads, self.head_dim]))
        out = attention(q, k, v, k_cache, v_cache).reshape([batch, length, self.heads * self.head_dim])
        normed, x = self.add_norm(x, paddle.matmul(out, attn.o_proj.weight), layer.post_attention_layernorm)
        mlp = layer.mlp
        return x, paddle.matmul(F.swiglu(paddle.matmul(normed, mlp.gate_up_proj.weight)), mlp.down_proj.weight)

    def rotation(self, max_len: int, positions: paddle.Tensor):
        """How q and k of tokens at `positions` [B, T] (on the device) are rotated: qkv [B, T, heads + 2 *
        kv_heads, head_dim] -> q, k (rotated), v. Fused: one kernel for q and k, which gathers the tables' rows
        itself; else the factors gathered once for every layer and four operations a layer."""
        cos_table, sin_table = self._tables(max_len)[:2]
        sections = [self.heads, self.kv_heads, self.kv_heads]
        if self.fused:
            from paddle.incubate.nn.functional import fused_rotary_position_embedding

            def rotate(qkv):
                q, k, v = paddle.split(qkv, sections, axis=2)
                q, k, _ = fused_rotary_position_embedding(q, k, None, sin=sin_table, cos=cos_table,
                                                          position_ids=positions, use_neox_rotary_style=False)
                return q, k, v

            return rotate
        shape = [*positions.shape, 1, self.head_dim]
        flat = positions.reshape([-1])
        cos, sin = paddle.index_select(cos_table, flat).reshape(shape), paddle.index_select(sin_table, flat).reshape(shape)
        half = self.head_dim // 2

        def rotate(qkv):
            qk, v = paddle.split(qkv, [self.heads + self.kv_heads, self.kv_heads], axis=2)
            qk = qk * cos + paddle.roll(qk, half, axis=-1) * sin
            q, k = paddle.split(qk, sections[:2], axis=2)
            return q, k, v

        return rotate

    def attend(self, q, keys, values, *, mask=None, causal: bool = False) -> paddle.Tensor:
        """Attention of q [B, T, heads, head_dim] over keys and values [B, S, kv_heads, head_dim]; `mask` [B, 1,
        T, S] additive, or `causal`."""
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, training=False,
                                              enable_gqa=self.heads != self.kv_heads)

    def add_norm(self, x, delta, norm) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(RMSNorm of x + delta, x + delta); delta None: of x. Where `fused` (GPU), Paddle's fused_rms_norm adds and
        normalizes in one kernel; else the addition and the reference's operations."""
        if self.fused:
            from paddle.incubate.nn.functional import fused_rms_norm

            # out = norm(x + residual), residual_out = x + residual
            fused = fused_rms_norm(x if delta is None else delta, norm.weight, None, norm.eps, x.ndim - 1,
                                   residual=None if delta is None else x)
            return fused[0], x if delta is None else fused[1]
        x = x if delta is None else x + delta
        return norm(x), x
