"""VQ-16 image tokenizer (LlamaGen), inference half: codebook lookup and decoder.

The encoder and quant_conv exist in checkpoints but text-to-image never runs them.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .config import VQConfig
from .pieces import Pieces

GROUPS = 32
GROUP_NORM_EPS = 1e-6


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, epsilon=GROUP_NORM_EPS)


class ResBlock(nn.Layer):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2D(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2D(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2D(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Layer):
    """Single-head self-attention over all pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2D(channels, channels, 1)
        self.k = nn.Conv2D(channels, channels, 1)
        self.v = nn.Conv2D(channels, channels, 1)
        self.proj_out = nn.Conv2D(channels, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # Written to export as a static program too (cpu VQ engine): batch stays symbolic (0 in reshape).
        _, channels, height, width = x.shape
        h = self.norm(x)
        q = self.q(h).reshape([0, channels, height * width])
        k = self.k(h).reshape([0, channels, height * width])
        v = self.v(h).reshape([0, channels, height * width])
        weights = F.softmax((q.transpose([0, 2, 1]) @ k) * (channels**-0.5), axis=-1)  # [B, query, key]
        out = (v @ weights.transpose([0, 2, 1])).reshape([0, channels, height, width])
        return x + self.proj_out(out)


class Upsample(nn.Layer):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2D(channels, channels, 3, padding=1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DecoderLevel(nn.Layer):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, upsample: bool):
        super().__init__()
        self.res = nn.LayerList([ResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)])
        self.attn = nn.LayerList([AttnBlock(out_channels) for _ in range(num_blocks)]) if attention else nn.LayerList()
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for part in self.parts():
            x = part(x)
        return x

    def parts(self) -> list[nn.Layer]:
        """Its layers in the order they run: each residual block (and its attention), then the upsampling."""
        parts = []
        for i, res in enumerate(self.res):
            parts += [res, self.attn[i]] if len(self.attn) else [res]
        return parts if self.upsample is None else [*parts, self.upsample]


class VQDecoder(nn.Layer):
    """[N, z_channels, 24, 24] latent -> [N, 3, 384, 384]. conv_blocks.0 is the lowest resolution."""

    def __init__(self, config: VQConfig):
        super().__init__()
        levels = len(config.ch_mult)
        block_in = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2D(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.LayerList([ResBlock(block_in, block_in), AttnBlock(block_in), ResBlock(block_in, block_in)])
        blocks = []
        for index, level in enumerate(reversed(range(levels))):
            block_out = config.ch * config.ch_mult[level]
            blocks.append(DecoderLevel(block_in, block_out, config.num_res_blocks + 1, attention=index == 0,
                                       upsample=index != levels - 1))
            block_in = block_out
        self.conv_blocks = nn.LayerList(blocks)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2D(block_in, 3, 3, padding=1)

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def pieces(self, z: paddle.Tensor) -> Pieces[paddle.Tensor]:
        """forward() in pieces (model/pieces.py): the lowest resolution's layers, then each residual block
        (with its attention) and each upsampling of the levels above; the same operations in the same order.
        forward() does not drain this: the OpenVINO export traces forward(), and a generator cannot be traced."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            for part in level.parts():
                if not isinstance(part, AttnBlock):
                    yield
                h = part(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModel(nn.Layer):
    """Codebook + decoder: image token codes -> pixels in about [-1, 1]."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        self.post_quant_conv = nn.Conv2D(config.codebook_dim, config.z_channels, 1)
        self.decoder = VQDecoder(config)

    def lookup(self, codes: paddle.Tensor) -> paddle.Tensor:
        """[N, h*w] codes -> [N, codebook_dim, h, w] L2-normalised codebook rows (square grid)."""
        batch, count = codes.shape
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} image tokens do not form a square grid")
        codebook = F.normalize(self.codebook.weight, p=2, axis=-1)
        rows = paddle.index_select(codebook, codes.reshape([-1]))
        return rows.reshape([batch, side, side, self.config.codebook_dim]).transpose([0, 3, 1, 2])

    def decode_codes(self, codes: paddle.Tensor) -> paddle.Tensor:
        return self.decoder(self.post_quant_conv(self.lookup(codes)))

    def decode_pieces(self, codes: paddle.Tensor) -> Pieces[paddle.Tensor]:
        """decode_codes() in pieces (VQDecoder.pieces)."""
        return (yield from self.decoder.pieces(self.post_quant_conv(self.lookup(codes))))
