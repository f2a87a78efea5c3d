"""SigLIP ViT image encoder for understanding (timm VisionTransformer as Janus builds it).

No class token, learned position embeddings, pre-norm blocks, final LayerNorm.
The attention-pool head exists in checkpoints but Janus never runs it.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import llama
from .config import VisionConfig
from .cpu_attention import prompt_attention
from .pieces import Pieces, drain, every
from .tensors import from_numpy

LAYER_NORM_EPS = 1e-6


class VisionAttention(nn.Layer):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, tokens, width = x.shape
        if llama.numpy_attention(x):
            qkv = llama.linear(self.qkv, x).reshape([batch, tokens, 3, self.heads, self.head_dim]).numpy()
            out = prompt_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=self.head_dim**-0.5, causal=False)
            return llama.linear(self.proj, from_numpy(out))
        qkv = self.qkv(x).reshape([batch, tokens, 3, self.heads, self.head_dim]).transpose([2, 0, 3, 1, 4])
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = paddle.matmul(q * (self.head_dim**-0.5), k, transpose_y=True)
        out = paddle.matmul(F.softmax(scores, axis=-1), v)
        return self.proj(out.transpose([0, 2, 1, 3]).reshape([batch, tokens, width]))


class VisionMLP(nn.Layer):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return llama.linear(self.fc2, F.gelu(llama.linear(self.fc1, x)))


class VisionBlock(nn.Layer):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, epsilon=LAYER_NORM_EPS)
        self.attn = VisionAttention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, epsilon=LAYER_NORM_EPS)
        self.mlp = VisionMLP(config.width, config.mlp_dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Layer):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2D(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return self.proj(pixel_values).flatten(2).transpose([0, 2, 1])


class SigLIPVisionTower(nn.Layer):
    """[N, 3, 384, 384] pixels in [-1, 1] -> [N, 576, width] features (after the final LayerNorm)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = self.create_parameter([1, config.num_patches, config.width])
        self.blocks = nn.LayerList([VisionBlock(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width, epsilon=LAYER_NORM_EPS)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        return drain(self.pieces(pixel_values))

    def pieces(self, pixel_values: paddle.Tensor, blocks: int | None = None) -> Pieces[paddle.Tensor]:
        """forward() in pieces of `blocks` blocks (model/pieces.py; None: one piece)."""
        x = self.patch_embed(pixel_values) + self.pos_embed
        for index, block in enumerate(self.blocks):
            if every(blocks, index):
                yield
            x = block(x)
        return self.norm(x)
