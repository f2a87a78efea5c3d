"""Previews of images still being generated, at almost no cost.

Decoding the codes sampled so far with the VQ decoder would show the image forming exactly, but it
costs a whole image decode per preview (about 0.35-0.6 s for Janus-1.3B's decoder on CPU, against
about 2 ms per language-model step on a GPU). Instead each code gets one colour: a linear map from
its (L2-normalised) codebook row to the mean colour of the 16x16 pixels the decoder draws for it,
fitted once by least squares on one decode of random codes. A preview is then a table lookup: a
24x24 grid of colours, with the codes not sampled yet left grey. (This is the "latent to RGB"
preview that diffusion front ends use.)
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

GRID = 24  # codes per side of a 384x384 image
PATCH = 16  # pixels per code per side
NOT_YET = np.array([128, 128, 128], np.uint8)


class PreviewPalette:
    """A colour per codebook entry; `previews(codes)` -> [n, 24, 24, 3] uint8."""

    def __init__(self, colors: np.ndarray):
        self.colors = colors  # [codebook_size, 3] uint8

    @classmethod
    def fit(cls, codebook: np.ndarray, decode: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> "PreviewPalette":
        """`codebook`: [K, d] rows; `decode`: [1, 576] int64 codes -> [1, 384, 384, 3] uint8 image."""
        rows = codebook / np.maximum(np.linalg.norm(codebook, axis=-1, keepdims=True), 1e-12)
        codes = np.random.default_rng(seed).integers(0, len(rows), (1, GRID * GRID), dtype=np.int64)
        image = np.asarray(decode(codes), np.float64)[0]
        means = image.reshape(GRID, PATCH, GRID, PATCH, 3).mean(axis=(1, 3)).reshape(-1, 3)
        features = np.concatenate([rows[codes[0]], np.ones((GRID * GRID, 1))], axis=1)
        weights, *_ = np.linalg.lstsq(features, means, rcond=None)
        colors = np.concatenate([rows, np.ones((len(rows), 1))], axis=1) @ weights
        return cls(np.clip(np.rint(colors), 0, 255).astype(np.uint8))

    def previews(self, codes: np.ndarray) -> np.ndarray:
        """`codes`: [n, s] the first s codes of n images (raster order) -> [n, 24, 24, 3] uint8."""
        codes = np.asarray(codes, np.int64)
        grid = np.broadcast_to(NOT_YET, (codes.shape[0], GRID * GRID, 3)).copy()
        grid[:, :codes.shape[1]] = self.colors[codes]
        return grid.reshape(codes.shape[0], GRID, GRID, 3)
