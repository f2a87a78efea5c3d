"""LLaMA decoder (DeepSeek-LLM inside Janus) with a static, slot-addressed KV cache.

Numerics follow transformers' LlamaForCausalLM: RMSNorm in float32, rotary
embeddings computed in float32 with the rotate-half convention, SiLU-gated MLP,
no biases. q/k/v and gate/up are stored fused (the loader concatenates them).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import cpu_blas
from .config import LlamaConfig
from .cpu_attention import Group, attend, plan_groups, prompt_attention, write_cache
from .tensors import from_numpy

# Cached-token attention on CPU float32 runs in numpy on the cache's memory (model/cpu_attention.py);
# False keeps it in Paddle everywhere (for comparison: bench/cpu_attention_bench.py).
CPU_NUMPY_ATTENTION = True


class KVCache:
    """Fixed key/value buffers for `num_slots` independent sequences of up to `max_len` tokens each.

    Positions are stored in blocks of `block_size`: per layer `k[i]` and `v[i]` are
    [num_blocks, num_slots, kv_heads, block_size, head_dim]. Attention then reads the used
    prefix of blocks as one contiguous view, because on CPU any gather or transpose of
    the cache costs more than the attention itself.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: str = "float32", block_size: int = 64, allocate=None):
        """`allocate(shape, dtype)`: where the buffers live, as zeroed numpy arrays (CPU only; the CPU
        runtime's: model/cpu_memory.lazy_zeros)."""
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {num_slots} x {max_len}")
        self.num_slots = num_slots
        self.max_len = max_len
        self.block_size = min(block_size, max_len)
        self.num_blocks = math.ceil(max_len / self.block_size)
        shape = [self.num_blocks, num_slots, kv_heads, self.block_size, head_dim]
        # Zeros, not empty: masked-out stale entries must be finite so that 0 * value stays 0.
        if allocate is None:
            self.k = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
            self.v = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        else:
            from_dlpack = paddle.utils.dlpack.from_dlpack
            self.k = [from_dlpack(allocate(shape, dtype)) for _ in range(num_layers)]
            self.v = [from_dlpack(allocate(shape, dtype)) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.k + self.v)


@dataclasses.dataclass
class _Step:
    """What every layer of one forward call shares: rotary tables, cache addresses and the attention mask."""

    cos: paddle.Tensor  # [B, T, 1, head_dim]
    sin_signed: paddle.Tensor  # sin with its first half negated: rotate_half(x) * sin == roll(x) * sin_signed
    write_block: paddle.Tensor | None  # [B, T] int64; None when host_write is used
    write_slot: paddle.Tensor | None
    write_offset: paddle.Tensor | None
    read_slots: paddle.Tensor | None  # None: the batch is every cache slot in order, read without a gather
    read_blocks: int
    mask: paddle.Tensor | None  # [read_blocks, B, 1, 1, T, block_size] additive; fresh: [T, T] causal
    groups: list[Group] | None = None  # set: attend over the cache in numpy (CPU float32), mask unused
    host_write: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # CPU float32: flat block, slot, offset
    fresh: bool = False  # every row starts at position 0: attend to the new keys only, not the cache


def rotary_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rotary_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [..., head_dim] in float32 for integer positions, as transformers' LlamaRotaryEmbedding."""
    freqs = positions.astype(np.float32)[..., None] * inv_freq
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)


class RMSNorm(nn.Layer):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x32 = x if x.dtype == paddle.float32 else x.astype("float32")
        x32 = x32 * paddle.rsqrt((x32 * x32).mean(axis=-1, keepdim=True) + self.eps)
        return self.weight * (x32 if x.dtype == paddle.float32 else x32.astype(x.dtype))


class Attention(nn.Layer):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        qkv_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_width, bias_attr=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias_attr=False)

    def forward(self, x: paddle.Tensor, k_cache: paddle.Tensor, v_cache: paddle.Tensor, step: _Step) -> paddle.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        qkv = linear(self.qkv_proj, x)
        qk, v = paddle.split(qkv, [(heads + kv_heads) * head_dim, kv_heads * head_dim], axis=-1)
        # Rotate q and k in one pass: they share positions.
        qk = qk.reshape([batch, length, heads + kv_heads, head_dim])
        qk = qk * step.cos + paddle.roll(qk, head_dim // 2, axis=-1) * step.sin_signed
        q, k = paddle.split(qk, [heads, kv_heads], axis=2)
        if step.host_write is not None:  # CPU float32: numpy writes the cache in place and attends
            k_host = k.numpy()
            v_host = v.numpy().reshape(batch, length, kv_heads, head_dim)
            write_cache(np.from_dlpack(k_cache), np.from_dlpack(v_cache), step.host_write,
                        k_host.reshape(batch * length, kv_heads, head_dim), v_host.reshape(batch * length, kv_heads, head_dim))
            if step.fresh:  # chunked causal attention over the prompt itself
                out = prompt_attention(q.numpy(), k_host, v_host, scale=self.scale, causal=True)
            else:
                out = attend(q.reshape([batch * length, heads, head_dim]).numpy(), np.from_dlpack(k_cache),
                             np.from_dlpack(v_cache), step.groups, kv_heads=kv_heads, length=length, scale=self.scale)
            return linear(self.o_proj, from_numpy(out.reshape(batch, length, heads * head_dim)))

        k_cache[step.write_block, step.write_slot, :, step.write_offset] = k
        v_cache[step.write_block, step.write_slot, :, step.write_offset] = v.reshape([batch, length, kv_heads, head_dim])
        if step.fresh:
            return self.o_proj(self._fresh_attention(q, k, v.reshape([batch, length, kv_heads, head_dim]), step.mask))

        keys = k_cache[: step.read_blocks]
        values = v_cache[: step.read_blocks]
        if step.read_slots is not None:
            keys = paddle.index_select(keys, step.read_slots, axis=1)
            values = paddle.index_select(values, step.read_slots, axis=1)

        q = q * self.scale
        if length == 1:
            q = q.reshape([batch, kv_heads, groups, head_dim])
        else:
            q = q.reshape([batch, length, kv_heads, groups, head_dim]).transpose([0, 2, 3, 1, 4])
            q = q.reshape([batch, kv_heads, groups * length, head_dim])
        # [blocks, B, kv_heads, groups*T, block]: q broadcasts over the blocks of the cache.
        scores = paddle.matmul(q, keys, transpose_y=True)
        blocks, block_size = step.read_blocks, scores.shape[-1]
        scores = scores.reshape([blocks, batch, kv_heads, groups, length, block_size]) + step.mask
        if blocks == 1:
            probs = F.softmax(scores, axis=-1)
        else:
            # Softmax over (block, offset) jointly, without moving the keys axis together.
            scores = paddle.exp(scores - scores.max(axis=[0, 5], keepdim=True))
            probs = scores / scores.sum(axis=[0, 5], keepdim=True)
        probs = probs.reshape([blocks, batch, kv_heads, groups * length, block_size])
        out = paddle.matmul(probs, values)
        out = out[0] if blocks == 1 else out.sum(axis=0)
        if length == 1:
            out = out.reshape([batch, 1, heads * head_dim])
        else:
            out = out.reshape([batch, kv_heads, groups, length, head_dim]).transpose([0, 3, 1, 2, 4])
            out = out.reshape([batch, length, heads * head_dim])
        return self.o_proj(out)


    def _fresh_attention(self, q, k, v, causal):
        """Causal attention of a prompt over itself (a prefill from position 0), [B, T, heads * head_dim]."""
        batch, length = q.shape[0], q.shape[1]
        kv_heads, groups, head_dim = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = (q * self.scale).reshape([batch, length, kv_heads, groups, head_dim]).transpose([0, 2, 3, 1, 4])
        q = q.reshape([batch, kv_heads, groups * length, head_dim])
        scores = paddle.matmul(q, k.transpose([0, 2, 1, 3]), transpose_y=True)
        scores = scores.reshape([batch, kv_heads, groups, length, length]) + causal
        probs = F.softmax(scores, axis=-1).reshape([batch, kv_heads, groups * length, length])
        out = paddle.matmul(probs, v.transpose([0, 2, 1, 3]))
        out = out.reshape([batch, kv_heads, groups, length, head_dim]).transpose([0, 3, 1, 2, 4])
        return out.reshape([batch, length, self.heads * head_dim])


class MLP(nn.Layer):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias_attr=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate, up = paddle.split(linear(self.gate_up_proj, x), 2, axis=-1)
        return linear(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Layer):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: paddle.Tensor, k_cache: paddle.Tensor, v_cache: paddle.Tensor, step: _Step) -> paddle.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), k_cache, v_cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Layer):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.inv_freq = rotary_inv_freq(config.head_dim, config.rope_theta)

    def new_cache(self, num_slots: int, max_len: int, dtype: str | None = None, block_size: int = 64,
                  allocate=None) -> KVCache:
        c = self.config
        dtype = dtype or str(self.embed_tokens.weight.dtype).replace("paddle.", "")
        return KVCache(c.num_hidden_layers, num_slots, max_len, c.num_key_value_heads, c.head_dim, dtype, block_size,
                       allocate=allocate)

    def forward(self, embeds: paddle.Tensor, cache: KVCache, slots, start) -> paddle.Tensor:
        """Run `embeds` [B, T, H] at positions start[b].. of cache rows slots[b]; returns the final-normed hidden."""
        if embeds.ndim != 3:
            raise ValueError(f"embeds must be [batch, tokens, hidden], got shape {list(embeds.shape)}")
        if len(cache.k) != len(self.layers):
            raise ValueError(f"the cache has {len(cache.k)} layers, the model {len(self.layers)}")
        step = self._step(cache, slots, start, embeds.shape[0], embeds.shape[1])
        x = embeds
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x = layer(x, k_cache, v_cache, step)
        return self.norm(x)

    def _step(self, cache: KVCache, slots, start, batch: int, length: int) -> _Step:
        slots, start, positions = cache_addresses(cache, slots, start, batch, length)
        cos, sin = rotary_cos_sin(positions, self.inv_freq)
        half = sin.shape[-1] // 2
        sin[..., :half] *= -1
        block_size = cache.block_size
        dtype = cache.k[0].dtype
        fresh = length > 1 and not start.any()
        host = numpy_attention(cache.k[0])
        on_host = host and not fresh
        read_blocks = -(-(int(positions.max()) + 1) // block_size)
        groups = mask = None
        if on_host:
            groups = plan_groups(slots, positions, block_size)
        elif fresh:  # on the host, prompt_attention masks by itself
            mask = None if host else np.triu(np.full((length, length), -np.inf, np.float32), k=1)
        else:
            key_positions = np.arange(read_blocks * block_size, dtype=np.int64).reshape(read_blocks, 1, 1, block_size)
            allowed = key_positions <= positions[None, :, :, None]  # [blocks, B, T, block]
            mask = np.where(allowed, np.float32(0.0), np.float32(-np.inf))
            mask = mask.reshape(read_blocks, batch, 1, 1, length, block_size)
        every_slot = batch == cache.num_slots and bool((slots == np.arange(batch)).all())
        write = (positions // block_size, np.broadcast_to(slots[:, None], positions.shape).copy(), positions % block_size)
        return _Step(
            cos=_to_dtype(from_numpy(cos[:, :, None, :]), dtype),
            sin_signed=_to_dtype(from_numpy(sin[:, :, None, :]), dtype),
            write_block=None if host else from_numpy(write[0]),
            write_slot=None if host else from_numpy(write[1]),
            write_offset=None if host else from_numpy(write[2]),
            read_slots=None if every_slot or on_host else from_numpy(slots),
            read_blocks=read_blocks,
            mask=None if mask is None else _to_dtype(from_numpy(mask), dtype),
            fresh=fresh,
            groups=groups,
            host_write=tuple(w.reshape(-1) for w in write) if host else None,
        )


class LlamaForCausalLM(nn.Layer):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)

    def forward(self, embeds: paddle.Tensor, cache: KVCache, slots, start) -> paddle.Tensor:
        return self.lm_head(self.model(embeds, cache, slots, start))


CPU_NUMPY_LINEAR = True
NUMPY_LINEAR_MIN_WEIGHTS = 1 << 20  # smaller products stay in Paddle: not worth the round trip
NUMPY_LINEAR_GEMV_ROWS = 2  # up to this many rows, one GEMV per row (OpenBLAS's GEMM is slow there)


def linear(layer: nn.Linear, x: paddle.Tensor) -> paddle.Tensor:
    """layer(x) for a Linear; on CPU float32 a large product runs in numpy's BLAS.

    Why: Paddle 3.3's CPU matmul streams the weights at a third to a half of OpenBLAS's
    speed. Measured on the 2-core dev box, [rows x 2048] @ [2048 x 11264] (one Janus-1.3B
    gate/up projection, 92 MB): 1 row 4.8 ms in Paddle against 2.8 ms in numpy, 8 rows
    16.7-22.4 against 6.2-7.4 ms, 620 rows 510-620 against 180-189 ms. OpenBLAS's GEMM is
    slow at 2 rows (7.4-7.7 ms), so 1 and 2 rows take one GEMV per row (2.8 ms each). The
    full-size LM (bench/decode_bench.py and its --paddle-matmul): a 620-token prefill 32.0 ->
    17.8 s; an image decode step of 8 rows 1067-1109 -> 514-560 ms, of 1 row 308-335 ->
    229-306 ms, of 2 rows 394-443 -> 386-449 ms.
    """
    weight = layer.weight
    if (CPU_NUMPY_LINEAR and cpu_float32(x) and math.prod(x.shape[:-1]) > 0  # an empty input stays in Paddle
            and weight.shape[0] * weight.shape[1] >= NUMPY_LINEAR_MIN_WEIGHTS):
        rows = x.numpy().reshape(-1, x.shape[-1])  # [rows, in]: one GEMM for all leading indices
        w = np.from_dlpack(weight.detach())
        with cpu_blas.gemm():
            out = np.stack([row @ w for row in rows]) if len(rows) <= NUMPY_LINEAR_GEMV_ROWS else rows @ w
        if layer.bias is not None:
            out += np.from_dlpack(layer.bias.detach())
        return from_numpy(out.reshape(*x.shape[:-1], out.shape[-1]))
    return layer(x)


def cpu_float32(tensor: paddle.Tensor) -> bool:
    return tensor.dtype == paddle.float32 and tensor.place.is_cpu_place()


def numpy_attention(tensor: paddle.Tensor) -> bool:
    """Whether attention over `tensor` (a cache or activations) runs in numpy: float32 on the CPU."""
    return CPU_NUMPY_ATTENTION and cpu_float32(tensor)


def _to_dtype(tensor: paddle.Tensor, dtype) -> paddle.Tensor:
    return tensor if tensor.dtype == dtype else tensor.astype(dtype)


def cache_addresses(cache: KVCache, slots, start, batch: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked host copies of `slots` and `start` [B], and the positions [B, T] of the new tokens."""
    slots = _host_int64(slots, batch, "slots")
    start = _host_int64(start, batch, "start")
    if (slots < 0).any() or (slots >= cache.num_slots).any():
        raise ValueError(f"slots {slots.tolist()} out of range for a cache of {cache.num_slots} slots")
    if len(np.unique(slots)) != batch:
        raise ValueError(f"slots {slots.tolist()} repeat a cache row")
    if (start < 0).any() or (start + length > cache.max_len).any():
        raise ValueError(f"positions start {start.tolist()} + {length} tokens exceed the cache length {cache.max_len}")
    return slots, start, start[:, None] + np.arange(length, dtype=np.int64)[None, :]


def _host_int64(value, batch: int, what: str) -> np.ndarray:
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    array = np.asarray(value, dtype=np.int64).reshape(-1)
    if array.shape != (batch,):
        raise ValueError(f"{what} must hold one value per batch row ({batch}), got shape {list(np.shape(value))}")
    return array
