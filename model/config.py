"""Janus configuration: dataclasses, named presets, and config.json reading/writing.

`JanusConfig.from_file` reads the HF `MultiModalityConfig` layout (also what the
PaddleNLP/PaddleMIX release writes). Sizes that config.json does not state
reliably (SigLIP width/depth, VQ widths) come from presets and are finalised
from the checkpoint's tensor shapes by `JanusConfig.with_checkpoint_shapes`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config.json that is not a Janus config, or asks for something unsupported."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    # Defaults are transformers' LlamaConfig defaults: some releases list only a few fields.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    select_layer: int = -1

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2


@dataclasses.dataclass(frozen=True)
class AlignerConfig:
    input_dim: int
    n_embed: int
    depth: int = 2


@dataclasses.dataclass(frozen=True)
class GenHeadConfig:
    n_embed: int = 2048
    image_token_embed: int = 2048
    image_token_size: int = 16384


@dataclasses.dataclass(frozen=True)
class JanusConfig:
    language: LlamaConfig
    vision: VisionConfig
    aligner: AlignerConfig
    gen_vision: VQConfig
    gen_aligner: AlignerConfig
    gen_head: GenHeadConfig
    image_token_size: int = 16384  # rows of gen_embed
    image_token_embed_dim: int = 8  # width of gen_embed (= the gen_aligner input)
    chat_roles: tuple[str, str] = ("User", "Assistant")
    name: str = ""

    @property
    def hidden_size(self) -> int:
        return self.language.hidden_size

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @classmethod
    def from_name(cls, name: str) -> "JanusConfig":
        try:
            config = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown model name {name!r}; known: {', '.join(sorted(PRESETS))}") from None
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "JanusConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not a readable JSON config: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a Janus config: the top level is not an object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "JanusConfig":
        component_keys = ("aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config")
        if "language_config" not in raw or (
            raw.get("model_type") != "multi_modality" and not any(k in raw for k in component_keys)
        ):
            raise ConfigError(
                f"{source} is not a Janus config: expected a multi_modality config with language_config, "
                f"vision_config, aligner_config, gen_vision_config, gen_aligner_config and gen_head_config "
                f"(model_type={raw.get('model_type')!r})"
            )
        language = _language_config(_as_dict(raw["language_config"], "language_config", source), source)
        hidden = language.hidden_size
        vision = _vision_config(_params(raw, "vision_config", source))
        aligner = _aligner_config(_params(raw, "aligner_config", source), vision.width, hidden, "aligner_config", source)
        gen_vision_params = _params(raw, "gen_vision_config", source)
        gen_vision = _vq_config(gen_vision_params)
        image_token_size = int(gen_vision_params.get("image_token_size", gen_vision.codebook_size))
        image_token_embed_dim = int(gen_vision_params.get("n_embed", gen_vision.codebook_dim))
        gen_aligner = _aligner_config(
            _params(raw, "gen_aligner_config", source), image_token_embed_dim, hidden, "gen_aligner_config", source
        )
        head_params = _params(raw, "gen_head_config", source)
        gen_head = GenHeadConfig(
            n_embed=int(head_params.get("n_embed", hidden)),
            image_token_embed=int(head_params.get("image_token_embed", hidden)),
            image_token_size=int(head_params.get("image_token_size", image_token_size)),
        )
        for what, width in (("aligner_config n_embed", aligner.n_embed), ("gen_aligner_config n_embed", gen_aligner.n_embed),
                            ("gen_head_config n_embed", gen_head.n_embed)):
            if width != hidden:
                raise ConfigError(f"{source}: {what} is {width}, but the language model hidden size is {hidden}")
        # Published config.json files don't name the roles; Janus-Pro checkpoints say who they are by name or folder.
        is_pro = "janus-pro" in f"{raw.get('_name_or_path', '')} {source}".lower()
        roles = raw.get("chat_roles", ("<|User|>", "<|Assistant|>") if is_pro else ("User", "Assistant"))
        if not (isinstance(roles, (list, tuple)) and len(roles) == 2 and all(isinstance(r, str) for r in roles)):
            raise ConfigError(f"{source}: chat_roles must be two strings, got {roles!r}")
        return cls(
            language=language,
            vision=vision,
            aligner=aligner,
            gen_vision=gen_vision,
            gen_aligner=gen_aligner,
            gen_head=gen_head,
            image_token_size=image_token_size,
            image_token_embed_dim=image_token_embed_dim,
            chat_roles=(roles[0], roles[1]),
            name=str(raw.get("_name_or_path", "")),
        )

    def with_checkpoint_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> "JanusConfig":
        """Take the SigLIP and VQ sizes from the weights (HF key names); config.json does not state them reliably.

        Only convolution, embedding, norm and bias shapes are read, which are the same in PyTorch and Paddle layouts.
        """
        vision = self.vision
        prefix = "vision_model.vision_tower."
        pos = shapes.get(prefix + "pos_embed")
        patch = shapes.get(prefix + "patch_embed.proj.weight")
        if pos is not None and len(pos) == 3 and patch is not None and len(patch) == 4:
            grid = math.isqrt(pos[1])
            vision = dataclasses.replace(vision, width=pos[2], patch_size=patch[-1], image_size=grid * patch[-1])
        depth = _count_indexed(shapes, prefix + "blocks.")
        if depth:
            vision = dataclasses.replace(vision, depth=depth)
        fc1_bias = shapes.get(prefix + "blocks.0.mlp.fc1.bias")
        if fc1_bias is not None and len(fc1_bias) == 1:
            vision = dataclasses.replace(vision, mlp_dim=fc1_bias[0])
        if vision.width % vision.heads:
            raise ConfigError(f"SigLIP width {vision.width} is not divisible by {vision.heads} heads")

        vq = self.gen_vision
        prefix = "gen_vision_model."
        codebook = shapes.get(prefix + "quantize.embedding.weight")
        if codebook is not None and len(codebook) == 2:
            vq = dataclasses.replace(vq, codebook_size=codebook[0], codebook_dim=codebook[1])
        post_quant = shapes.get(prefix + "post_quant_conv.weight")
        if post_quant is not None and len(post_quant) == 4:
            vq = dataclasses.replace(vq, z_channels=post_quant[0])
        levels = _count_indexed(shapes, prefix + "decoder.conv_blocks.")
        if levels:
            # conv_blocks.0 is the lowest resolution; ch_mult[0] is 1 in every VQ-16 variant.
            widths = [shapes.get(f"{prefix}decoder.conv_blocks.{i}.res.0.conv1.bias") for i in range(levels)]
            if all(w is not None and len(w) == 1 for w in widths):
                ch = widths[-1][0]
                if any(w[0] % ch for w in widths):
                    raise ConfigError(f"VQ decoder widths {[w[0] for w in widths]} are not multiples of {ch}")
                vq = dataclasses.replace(vq, ch=ch, ch_mult=tuple(w[0] // ch for w in reversed(widths)))
            res = _count_indexed(shapes, prefix + "decoder.conv_blocks.0.res.")
            if res:
                vq = dataclasses.replace(vq, num_res_blocks=res - 1)
        return dataclasses.replace(self, vision=vision, gen_vision=vq)

    def to_dict(self) -> dict[str, Any]:
        """HF-style config.json content (the layout of the real deepseek-ai/Janus-1.3B file, plus sizes)."""
        lm, vision, vq = self.language, self.vision, self.gen_vision
        return {
            "_name_or_path": self.name,
            "architectures": ["MultiModalityCausalLM"],
            "model_type": "multi_modality",
            "torch_dtype": "float32",
            "chat_roles": list(self.chat_roles),
            "language_config": {
                "model_type": "llama",
                "hidden_act": "silu",
                "vocab_size": lm.vocab_size,
                "hidden_size": lm.hidden_size,
                "intermediate_size": lm.intermediate_size,
                "num_hidden_layers": lm.num_hidden_layers,
                "num_attention_heads": lm.num_attention_heads,
                "num_key_value_heads": lm.num_key_value_heads,
                "rms_norm_eps": lm.rms_norm_eps,
                "rope_theta": lm.rope_theta,
                "max_position_embeddings": lm.max_position_embeddings,
                "tie_word_embeddings": False,
                "torch_dtype": "float32",
            },
            "vision_config": {
                "cls": "CLIPVisionTower",
                "model_type": "vision",
                "params": {
                    "model_name": vision.model_name,
                    "image_size": vision.image_size,
                    "select_feature": "same",
                    "select_layer": vision.select_layer,
                    "width": vision.width,
                    "layers": vision.depth,
                    "heads": vision.heads,
                    "patch_size": vision.patch_size,
                    "mlp_ratio": vision.mlp_dim / vision.width,
                },
            },
            "aligner_config": _aligner_dict(self.aligner, "aligner"),
            "gen_vision_config": {
                "cls": "VQ-16",
                "model_type": "gen_vision",
                "params": {
                    "image_token_size": self.image_token_size,
                    "n_embed": self.image_token_embed_dim,
                    "codebook_size": vq.codebook_size,
                    "codebook_embed_dim": vq.codebook_dim,
                    "z_channels": vq.z_channels,
                    "ch": vq.ch,
                    "ch_mult": list(vq.ch_mult),
                    "num_res_blocks": vq.num_res_blocks,
                },
            },
            "gen_aligner_config": _aligner_dict(self.gen_aligner, "gen_aligner"),
            "gen_head_config": {
                "cls": "vision_head",
                "model_type": "gen_head",
                "params": dataclasses.asdict(self.gen_head),
            },
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def expected_hf_shapes(config: JanusConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by its HF checkpoint name, with its PyTorch-layout shape (Linear [out, in])."""
    shapes: dict[str, tuple[int, ...]] = {}
    lm = config.language
    hidden, head_dim = lm.hidden_size, lm.head_dim
    q_width, kv_width = lm.num_attention_heads * head_dim, lm.num_key_value_heads * head_dim
    shapes["language_model.model.embed_tokens.weight"] = (lm.vocab_size, hidden)
    for i in range(lm.num_hidden_layers):
        p = f"language_model.model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (q_width, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_width, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_width, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_width)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (lm.intermediate_size, hidden)
        shapes[p + "mlp.up_proj.weight"] = (lm.intermediate_size, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, lm.intermediate_size)
    shapes["language_model.model.norm.weight"] = (hidden,)
    shapes["language_model.lm_head.weight"] = (lm.vocab_size, hidden)

    v = config.vision
    p = "vision_model.vision_tower."
    shapes[p + "patch_embed.proj.weight"] = (v.width, 3, v.patch_size, v.patch_size)
    shapes[p + "patch_embed.proj.bias"] = (v.width,)
    shapes[p + "pos_embed"] = (1, v.num_patches, v.width)
    for i in range(v.depth):
        b = f"{p}blocks.{i}."
        _add_linear(shapes, b + "attn.qkv", 3 * v.width, v.width)
        _add_linear(shapes, b + "attn.proj", v.width, v.width)
        _add_linear(shapes, b + "mlp.fc1", v.mlp_dim, v.width)
        _add_linear(shapes, b + "mlp.fc2", v.width, v.mlp_dim)
        _add_norm(shapes, b + "norm1", v.width)
        _add_norm(shapes, b + "norm2", v.width)
    _add_norm(shapes, p + "norm", v.width)

    _add_aligner(shapes, "aligner", config.aligner)
    _add_aligner(shapes, "gen_aligner", config.gen_aligner)
    head = config.gen_head
    _add_linear(shapes, "gen_head.output_mlp_projector", head.image_token_embed, head.n_embed)
    _add_linear(shapes, "gen_head.vision_head", head.image_token_size, head.image_token_embed)
    shapes["gen_embed.weight"] = (config.image_token_size, config.image_token_embed_dim)

    vq = config.gen_vision
    p = "gen_vision_model."
    shapes[p + "quantize.embedding.weight"] = (vq.codebook_size, vq.codebook_dim)
    _add_conv(shapes, p + "post_quant_conv", vq.z_channels, vq.codebook_dim, 1)
    d = p + "decoder."
    block_in = vq.ch * vq.ch_mult[-1]
    _add_conv(shapes, d + "conv_in", block_in, vq.z_channels, 3)
    _add_resblock(shapes, d + "mid.0", block_in, block_in)
    _add_attnblock(shapes, d + "mid.1", block_in)
    _add_resblock(shapes, d + "mid.2", block_in, block_in)
    levels = len(vq.ch_mult)
    for index, level in enumerate(reversed(range(levels))):
        b = f"{d}conv_blocks.{index}."
        block_out = vq.ch * vq.ch_mult[level]
        for j in range(vq.num_res_blocks + 1):
            _add_resblock(shapes, f"{b}res.{j}", block_in, block_out)
            block_in = block_out
            if index == 0:
                _add_attnblock(shapes, f"{b}attn.{j}", block_in)
        if index != levels - 1:
            _add_conv(shapes, b + "upsample.conv", block_in, block_in, 3)
    _add_norm(shapes, d + "norm_out", block_in)
    _add_conv(shapes, d + "conv_out", 3, block_in, 3)
    return shapes


def _add_linear(shapes: dict, name: str, out_features: int, in_features: int) -> None:
    shapes[name + ".weight"] = (out_features, in_features)
    shapes[name + ".bias"] = (out_features,)


def _add_norm(shapes: dict, name: str, width: int) -> None:
    shapes[name + ".weight"] = (width,)
    shapes[name + ".bias"] = (width,)


def _add_conv(shapes: dict, name: str, out_channels: int, in_channels: int, kernel: int) -> None:
    shapes[name + ".weight"] = (out_channels, in_channels, kernel, kernel)
    shapes[name + ".bias"] = (out_channels,)


def _add_resblock(shapes: dict, name: str, in_channels: int, out_channels: int) -> None:
    _add_norm(shapes, name + ".norm1", in_channels)
    _add_conv(shapes, name + ".conv1", out_channels, in_channels, 3)
    _add_norm(shapes, name + ".norm2", out_channels)
    _add_conv(shapes, name + ".conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _add_conv(shapes, name + ".nin_shortcut", out_channels, in_channels, 1)


def _add_attnblock(shapes: dict, name: str, channels: int) -> None:
    _add_norm(shapes, name + ".norm", channels)
    for part in ("q", "k", "v", "proj_out"):
        _add_conv(shapes, f"{name}.{part}", channels, channels, 1)


def _add_aligner(shapes: dict, name: str, aligner: AlignerConfig) -> None:
    _add_linear(shapes, f"{name}.layers.0", aligner.n_embed, aligner.input_dim)
    for i in range(1, aligner.depth):
        _add_linear(shapes, f"{name}.layers.{2 * i}", aligner.n_embed, aligner.n_embed)


def _count_indexed(shapes: Mapping[str, Any], prefix: str) -> int:
    indices = {int(m.group(1)) for key in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _as_dict(value: Any, what: str, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {what} must be an object, got {type(value).__name__}")
    return value


def _params(raw: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    section = _as_dict(raw.get(key, {}), key, source)
    params = section.get("params", section)
    return _as_dict(params, key + ".params", source)


def _language_config(raw: dict[str, Any], source: str) -> LlamaConfig:
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: language_config model_type {model_type!r} is not supported (llama only)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: language_config hidden_act {act!r} is not supported (silu only)")
    if raw.get("rope_scaling"):
        raise ConfigError(f"{source}: language_config rope_scaling {raw['rope_scaling']!r} is not supported")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError(f"{source}: language_config with attention/mlp biases is not supported")
    if raw.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: language_config with tied word embeddings is not supported")
    defaults = LlamaConfig()
    heads = int(raw.get("num_attention_heads", defaults.num_attention_heads))
    kv_heads = raw.get("num_key_value_heads")
    config = LlamaConfig(
        vocab_size=int(raw.get("vocab_size", defaults.vocab_size)),
        hidden_size=int(raw.get("hidden_size", defaults.hidden_size)),
        intermediate_size=int(raw.get("intermediate_size", defaults.intermediate_size)),
        num_hidden_layers=int(raw.get("num_hidden_layers", defaults.num_hidden_layers)),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", defaults.rms_norm_eps)),
        rope_theta=float(raw.get("rope_theta", defaults.rope_theta)),
        max_position_embeddings=int(raw.get("max_position_embeddings", defaults.max_position_embeddings)),
    )
    head_dim = raw.get("head_dim")
    if config.hidden_size % heads or (head_dim is not None and int(head_dim) != config.head_dim):
        raise ConfigError(f"{source}: hidden_size {config.hidden_size} with {heads} heads is not supported")
    if heads % config.num_key_value_heads:
        raise ConfigError(f"{source}: {heads} heads is not a multiple of {config.num_key_value_heads} key/value heads")
    return config


def _vision_config(params: dict[str, Any]) -> VisionConfig:
    name = str(params.get("model_name", VisionConfig.model_name))
    base = SIGLIP_PRESETS.get(name, VisionConfig(model_name=name))
    width = int(params.get("width", base.width))
    if "heads" in params:
        heads = int(params["heads"])
    elif name in SIGLIP_PRESETS:
        heads = base.heads
    elif m := re.search(r"_h(\d+)(?:_|$)", name):
        heads = int(m.group(1))
    else:
        heads = max(width // 64, 1)  # SigLIP/ViT heads are 64 wide
    depth = int(params.get("layers", base.depth))
    select_layer = int(params.get("select_layer", -1))
    # The official tower builds only the blocks up to select_layer (then always the final norm).
    built = min(depth, depth + select_layer + 1) if select_layer <= 0 else min(depth, select_layer)
    mlp_ratio = params.get("mlp_ratio")
    return VisionConfig(
        model_name=name,
        image_size=int(params.get("image_size", base.image_size)),
        patch_size=int(params.get("patch_size", base.patch_size)),
        width=width,
        depth=built,
        heads=heads,
        mlp_dim=int(round(width * float(mlp_ratio))) if mlp_ratio is not None else base.mlp_dim * width // base.width,
        select_layer=select_layer,
    )


def _vq_config(params: dict[str, Any]) -> VQConfig:
    base = VQConfig()
    return VQConfig(
        codebook_size=int(params.get("codebook_size", base.codebook_size)),
        codebook_dim=int(params.get("codebook_embed_dim", base.codebook_dim)),
        z_channels=int(params.get("z_channels", base.z_channels)),
        ch=int(params.get("ch", base.ch)),
        ch_mult=tuple(int(m) for m in params.get("ch_mult", base.ch_mult)),
        num_res_blocks=int(params.get("num_res_blocks", base.num_res_blocks)),
    )


def _aligner_config(params: dict[str, Any], input_dim: int, hidden: int, what: str, source: str) -> AlignerConfig:
    projector = params.get("projector_type", "mlp_gelu")
    if projector != "mlp_gelu":
        raise ConfigError(f"{source}: {what} projector_type {projector!r} is not supported (mlp_gelu only)")
    depth = int(params.get("depth", 2))
    if depth < 1:
        raise ConfigError(f"{source}: {what} depth must be at least 1, got {depth}")
    return AlignerConfig(
        input_dim=int(params.get("input_dim", input_dim)), n_embed=int(params.get("n_embed", hidden)), depth=depth
    )


def _aligner_dict(aligner: AlignerConfig, model_type: str) -> dict[str, Any]:
    return {
        "cls": "MlpProjector",
        "model_type": model_type,
        "params": {
            "depth": aligner.depth,
            "input_dim": aligner.input_dim,
            "n_embed": aligner.n_embed,
            "projector_type": "mlp_gelu",
        },
    }


SIGLIP_PRESETS: dict[str, VisionConfig] = {
    "siglip_large_patch16_384": VisionConfig(),
    "siglip_tiny_w32_d2_h2_patch16_384": VisionConfig(
        model_name="siglip_tiny_w32_d2_h2_patch16_384", width=32, depth=2, heads=2, mlp_dim=128
    ),
}


def _janus(name: str, hidden: int, intermediate: int, layers: int, heads: int, roles: tuple[str, str]) -> JanusConfig:
    return JanusConfig(
        language=LlamaConfig(
            vocab_size=102400,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=16384,
        ),
        vision=SIGLIP_PRESETS["siglip_large_patch16_384"],
        aligner=AlignerConfig(input_dim=1024, n_embed=hidden),
        gen_vision=VQConfig(),
        gen_aligner=AlignerConfig(input_dim=8, n_embed=hidden),
        gen_head=GenHeadConfig(n_embed=hidden, image_token_embed=hidden, image_token_size=16384),
        chat_roles=roles,
        name=name,
    )


PRESETS: dict[str, JanusConfig] = {
    "deepseek-ai/Janus-1.3B": _janus("deepseek-ai/Janus-1.3B", 2048, 5632, 24, 16, ("User", "Assistant")),
    "deepseek-ai/Janus-Pro-1B": _janus("deepseek-ai/Janus-Pro-1B", 2048, 5632, 24, 16, ("<|User|>", "<|Assistant|>")),
    "deepseek-ai/Janus-Pro-7B": _janus("deepseek-ai/Janus-Pro-7B", 4096, 11008, 30, 32, ("<|User|>", "<|Assistant|>")),
    # The server's built-in small model: the real structure and 384 px geometry at the golden tiny sizes.
    "janus-tiny": JanusConfig(
        language=LlamaConfig(
            vocab_size=600,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        ),
        vision=SIGLIP_PRESETS["siglip_tiny_w32_d2_h2_patch16_384"],
        aligner=AlignerConfig(input_dim=32, n_embed=64),
        gen_vision=VQConfig(codebook_size=64, codebook_dim=8, z_channels=16, ch=32),
        gen_aligner=AlignerConfig(input_dim=8, n_embed=64),
        gen_head=GenHeadConfig(n_embed=64, image_token_embed=64, image_token_size=64),
        image_token_size=64,
        image_token_embed_dim=8,
        name="janus-tiny",
    ),
}
