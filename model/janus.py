"""JanusModel: the composite that generation and the worker call (interface in ARCHITECTURE.md)."""
from __future__ import annotations

import contextlib

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .config import AlignerConfig, GenHeadConfig, JanusConfig
from .llama import KVCache, LlamaForCausalLM, linear
from .pieces import Pieces, drain
from .siglip import SigLIPVisionTower
from .tensors import from_numpy
from .vq import VQModel


class MlpProjector(nn.Layer):
    """Linear -> (GELU -> Linear) x (depth - 1); checkpoint keys layers.0, layers.2, ..."""

    def __init__(self, config: AlignerConfig):
        super().__init__()
        layers: list[nn.Layer] = [nn.Linear(config.input_dim, config.n_embed)]
        for _ in range(1, config.depth):
            layers += [nn.GELU(), nn.Linear(config.n_embed, config.n_embed)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for layer in self.layers:
            x = linear(layer, x) if isinstance(layer, nn.Linear) else layer(x)
        return x


class GenHead(nn.Layer):
    """Hidden state -> image-token logits: Linear -> GELU -> Linear."""

    def __init__(self, config: GenHeadConfig):
        super().__init__()
        self.output_mlp_projector = nn.Linear(config.n_embed, config.image_token_embed)
        self.vision_head = nn.Linear(config.image_token_embed, config.image_token_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(self.vision_head, F.gelu(linear(self.output_mlp_projector, x)))


@contextlib.contextmanager
def _default_dtype(dtype: str):
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


class JanusModel(nn.Layer):
    """Janus: SigLIP + aligner for understanding, LLaMA decoder, VQ-16 + gen head for text-to-image.

    All inputs may be numpy arrays or Paddle tensors; outputs are Paddle tensors. The VQ
    decoder always runs in float32; the rest runs in `dtype` (float32 on CPU).
    """

    def __init__(self, config: JanusConfig, dtype: str = "float32"):
        super().__init__()
        self.config = config
        self.dtype_name = dtype
        with _default_dtype(dtype):
            self.language_model = LlamaForCausalLM(config.language)
            self.vision_model = SigLIPVisionTower(config.vision)
            self.aligner = MlpProjector(config.aligner)
            self.gen_aligner = MlpProjector(config.gen_aligner)
            self.gen_head = GenHead(config.gen_head)
            self.gen_embed = nn.Embedding(config.image_token_size, config.image_token_embed_dim)
        with _default_dtype("float32"):
            self.gen_vision_model = VQModel(config.gen_vision)

    @paddle.no_grad()
    def encode_images(self, pixel_values) -> paddle.Tensor:
        """[N, 3, 384, 384] pixels in [-1, 1] -> [N, 576, hidden] (SigLIP + aligner)."""
        return drain(self.encode_image_pieces(pixel_values))

    def encode_image_pieces(self, pixel_values, blocks: int | None = None) -> Pieces[paddle.Tensor]:
        """encode_images() in pieces of `blocks` SigLIP blocks (model/pieces.py)."""
        features = yield from self.vision_model.pieces(_tensor(pixel_values, self.dtype_name), blocks)
        return self.aligner(features)

    @paddle.no_grad()
    def embed_tokens(self, ids) -> paddle.Tensor:
        """[B, T] int64 token ids -> [B, T, hidden]."""
        return self.language_model.model.embed_tokens(_tensor(ids, "int64"))

    @paddle.no_grad()
    def embed_with_images(self, input_ids, image_mask, pixel_values) -> paddle.Tensor:
        """Token embeddings [B, T, hidden] with the image features put at the image positions.

        `image_mask` [B, T] is True at the 576 placeholder positions of each image, in order;
        `pixel_values` [N, 3, 384, 384] holds the images of all rows in order.
        """
        ids = np.maximum(np.asarray(_numpy(input_ids), dtype=np.int64), 0)  # the reference maps negative ids to 0
        mask = np.asarray(_numpy(image_mask), dtype=bool)
        if mask.shape != ids.shape:
            raise ValueError(f"image_mask shape {list(mask.shape)} differs from input_ids shape {list(ids.shape)}")
        embeds = self.embed_tokens(ids)
        if not mask.any():
            return embeds
        features = self.encode_images(pixel_values)
        features = features.reshape([-1, features.shape[-1]])
        if features.shape[0] != int(mask.sum()):
            raise ValueError(f"{int(mask.sum())} image positions but {features.shape[0]} image features")
        batch, length, hidden = embeds.shape
        flat = embeds.reshape([batch * length, hidden])
        flat[from_numpy(np.flatnonzero(mask.reshape(-1)))] = features.astype(flat.dtype)
        return flat.reshape([batch, length, hidden])

    @paddle.no_grad()
    def embed_image_tokens(self, codes) -> paddle.Tensor:
        """[B] or [B, T] image-token codes -> [B, (T,) hidden]: gen_aligner(gen_embed(codes))."""
        return self.gen_aligner(self.gen_embed(_tensor(codes, "int64")))

    def new_cache(self, slots: int, max_len: int, block_size: int = 64, allocate=None) -> KVCache:
        return self.language_model.model.new_cache(slots, max_len, block_size=block_size, allocate=allocate)

    @paddle.no_grad()
    def forward_hidden(self, embeds, cache: KVCache, slots, start) -> paddle.Tensor:
        """Decoder pass over `embeds` [B, T, hidden]; row b uses cache row slots[b] at positions start[b]...

        Returns the final-normed hidden states [B, T, hidden].
        """
        return self.language_model.model(_tensor(embeds, self.dtype_name), cache, slots, start)

    @paddle.no_grad()
    def text_logits(self, hidden) -> paddle.Tensor:
        return linear(self.language_model.lm_head, _tensor(hidden, self.dtype_name)).astype("float32")

    @paddle.no_grad()
    def image_logits(self, hidden) -> paddle.Tensor:
        return self.gen_head(_tensor(hidden, self.dtype_name)).astype("float32")

    @paddle.no_grad()
    def decode_image_tokens(self, codes) -> paddle.Tensor:
        """[N, 576] image-token codes -> [N, 3, 384, 384] float32 pixels in about [-1, 1] (VQ decode)."""
        return self.gen_vision_model.decode_codes(_tensor(codes, "int64"))

    def decode_image_pieces(self, codes) -> Pieces[paddle.Tensor]:
        """decode_image_tokens() in pieces (model/vq.py's VQDecoder.pieces)."""
        return (yield from self.gen_vision_model.decode_pieces(_tensor(codes, "int64")))


def _numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _tensor(value, dtype: str) -> paddle.Tensor:
    tensor = value if isinstance(value, paddle.Tensor) else from_numpy(np.asarray(value))
    return tensor if tensor.dtype == getattr(paddle, dtype) else tensor.astype(dtype)
