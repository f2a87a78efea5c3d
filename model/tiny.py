"""The built-in `janus-tiny` checkpoint: real Janus structure, tiny widths, random weights.

Made offline and deterministically (same bytes on every run and machine), so
the server and its tests can run end to end without downloading 4 GB. The
folder looks like a Hugging Face Janus-1.3B release: config.json,
model.safetensors (PyTorch layouts, every key of the real checkpoint),
tokenizer files and preprocessing configs. Its text and images are noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from model.processor import BOS_TOKEN, EOS_TOKEN, JANUS_SPECIAL_TOKENS, PAD_TOKEN

NAME = "janus-tiny"
# Bump whenever any written byte changes, so stale folders are rebuilt.
FORMAT_VERSION = 1
MANIFEST = "janus-tiny.json"
WEIGHT_SEED = 166  # picked among seeds 1-200 for wide greedy margins and varied greedy text and image codes

BPE_VOCAB_SIZE = 578  # byte-level ids learnt from TRAINING_TEXT; the Janus special tokens follow
VOCAB_SIZE = 600      # embedding rows; the rows past the tokenizer are never produced
HIDDEN, INTERMEDIATE, LAYERS, HEADS = 64, 128, 2, 4
VISION_WIDTH, VISION_LAYERS, VISION_HEADS, PATCH, IMAGE_SIZE, MLP_RATIO = 32, 2, 2, 16, 384, 4
VQ_CH, VQ_CH_MULT, VQ_RES_BLOCKS, VQ_Z, CODEBOOK_SIZE, CODEBOOK_DIM = 32, (1, 1, 2, 2, 4), 2, 16, 64, 8
IMAGE_TOKEN_EMBED = 64

TRAINING_TEXT = """\
The picture shows a small red house at the edge of a green field. Behind the house
there is a line of tall trees, and above them the sky is pale blue with a few white
clouds. A narrow path of grey stones leads from the road to the front door.

On the kitchen table there are three apples, a glass of water and a wooden bowl full
of bread. Morning light comes through the window and draws long yellow squares on the
floor. The cat sleeps on a chair near the warm oven, and the clock on the wall reads
half past seven.

A circle is a round shape with no corners. A square has four equal sides and four
right angles. A triangle has three sides, and a rectangle is longer than it is wide.
When you describe an image, name the shapes you see, their colours, their sizes and
where they are: on the left, on the right, in the middle, near the top or at the bottom.

The harbour was busy before sunrise. Fishing boats painted blue, orange and white
rocked against the wooden pier while the sailors carried boxes of ice and nets. Gulls
circled above the masts, calling loudly, and the smell of salt and diesel filled the
cold air. By noon the market stalls were selling silver fish, black mussels and pink
shrimp to cooks from every restaurant in town.

In the garden the roses were open and the tomatoes were turning from green to red.
Bees moved slowly between the lavender and the mint. An old watering can stood beside
the gate, and a pair of muddy boots waited on the step for the rain to stop.

Please read the question carefully and answer in one or two sentences. If the picture
is dark or blurry, say so. If there is text in the image, copy it exactly. Count the
people, animals and objects when the question asks how many there are.

The workshop smelled of sawdust and oil. Hammers, saws and chisels hung on the wall in
neat rows, each tool above its painted outline. On the bench a half finished chair
waited for its last leg, and a radio played quiet music from a shelf in the corner.

Mountains rise behind the lake, their tops covered with snow even in summer. The water
is so clear that you can see the round pebbles on the bottom. A red canoe floats near
the shore, and two hikers with heavy backpacks walk along the trail under the pines.

The library was quiet except for the turning of pages. Long tables of dark wood filled
the hall, and green lamps glowed above them. Students wrote notes, a teacher searched
the shelves for an atlas, and a boy fell asleep on a book about the history of ships.

A photo of a city street at night: yellow taxis wait at a crossing, shop windows shine
with bright signs, and people with umbrellas hurry across the wet road. Reflections of
red and green lights stretch across the puddles like painted stripes.

Draw a bright orange sun over a calm sea, with a white sailboat near the horizon and
a family building a sand castle on the beach. Paint a forest in autumn with brown,
gold and purple leaves falling on a quiet river. Show a friendly robot reading a
newspaper in a sunny park, sitting on a bench next to a sleeping dog.

Which image is brighter? The first one has a black background and a small grey square,
while the second one is almost white with a blue circle in the centre. The second image
is brighter because most of its pixels are light. Compare the two pictures and explain
what changed between them.

Numbers help us measure the world: one, two, three, four, five, six, seven, eight, nine
and ten. A week has seven days, a year has twelve months, and a clock counts sixty
minutes in every hour. The train leaves at 9:45 and arrives at 11:30.

Every evening the farmer walked the dog around the fields, checking the fences and the
water for the sheep. The wind carried the sound of a distant bell. When the first stars
appeared, the windows of the farmhouse turned golden and supper was ready on the table.
"""


def ensure_janus_tiny(home: str | Path) -> Path:
    """`<home>/janus-tiny/`, built on first use (atomically) and reused while its format is current."""
    home = Path(home)
    target = home / NAME
    if is_current(target):
        return target
    home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-building-", dir=home))
    try:
        write_janus_tiny(staging)
        if target.exists() and not is_current(target):
            # Stale or damaged: move it out of the way in one step, then delete it at leisure.
            discarded = Path(tempfile.mkdtemp(prefix=f".{NAME}-stale-", dir=home))
            try:
                os.rename(target, discarded / NAME)
            except FileNotFoundError:
                pass  # another process removed it first
            shutil.rmtree(discarded, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process installed it between our check and our rename.
            if not is_current(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_current(folder: Path) -> bool:
    """True when `folder` holds a complete janus-tiny of FORMAT_VERSION (by its manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            return False
        return all((folder / name).stat().st_size == entry["bytes"] for name, entry in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_janus_tiny(folder: Path) -> None:
    """Write every file of the checkpoint into an existing, empty `folder`, the manifest last."""
    tokenizer = build_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    write_json(folder / "config.json", model_config())
    write_json(folder / "tokenizer_config.json", tokenizer_config(tokenizer))
    write_json(folder / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})
    write_json(folder / "processor_config.json", PROCESSOR_CONFIG)
    write_json(folder / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    save_file(make_weights(tokenizer), str(folder / "model.safetensors"), metadata={"format": "pt"})

    files = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        files[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_json(folder / MANIFEST, {"name": NAME, "format_version": FORMAT_VERSION, "files": files})


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE learnt from TRAINING_TEXT, then the 14 Janus special tokens, BOS added on encode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.split("\n\n"), trainer=trainer)
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training gave {tokenizer.get_vocab_size()} ids, expected {BPE_VOCAB_SIZE}")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in JANUS_SPECIAL_TOKENS])
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    added = {
        str(token_id): {
            "content": token.content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "extra_special_tokens": {},
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": None,
        "use_default_system_prompt": False,
    }


PROCESSOR_CONFIG = {
    "add_special_token": False,
    "ignore_id": -100,
    "image_tag": "<image_placeholder>",
    "mask_prompt": True,
    "num_image_tokens": (IMAGE_SIZE // PATCH) ** 2,
    "processor_class": "VLChatProcessor",
    "sft_format": "deepseek",
}

PREPROCESSOR_CONFIG = {
    "background_color": [127, 127, 127],
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "VLMImageProcessor",
    "image_size": IMAGE_SIZE,
    "image_std": [0.5, 0.5, 0.5],
    "min_size": 14,
    "processor_class": "VLChatProcessor",
    "rescale_factor": 0.00392156862745098,
}


def model_config() -> dict[str, Any]:
    """config.json in the layout of the HF Janus-1.3B release, with the tiny sizes."""
    return {
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"depth": 2, "input_dim": VISION_WIDTH, "n_embed": HIDDEN, "projector_type": "mlp_gelu"},
        },
        "architectures": ["MultiModalityCausalLM"],
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"depth": 2, "input_dim": CODEBOOK_DIM, "n_embed": HIDDEN, "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"image_token_embed": IMAGE_TOKEN_EMBED, "image_token_size": CODEBOOK_SIZE, "n_embed": HIDDEN},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": CODEBOOK_SIZE,
                "n_embed": CODEBOOK_DIM,
                "codebook_size": CODEBOOK_SIZE,
                "codebook_embed_dim": CODEBOOK_DIM,
                "z_channels": VQ_Z,
                "ch": VQ_CH,
                "ch_mult": list(VQ_CH_MULT),
                "num_res_blocks": VQ_RES_BLOCKS,
            },
        },
        "language_config": {
            "hidden_act": "silu",
            "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS,
            "num_key_value_heads": HEADS,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": VOCAB_SIZE,
        },
        "model_type": "multi_modality",
        "torch_dtype": "float32",
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": IMAGE_SIZE,
                "model_name": "siglip_tiny_w32_d2_h2_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
                "width": VISION_WIDTH,
                "layers": VISION_LAYERS,
                "heads": VISION_HEADS,
                "patch_size": PATCH,
                "mlp_ratio": MLP_RATIO,
                "global_pool": "map",
            },
        },
    }


# How each tensor is drawn (the scheme of the golden README): "weight" N(0,1)/sqrt(fan_in),
# "bias" 0.05 N, "scale" 1 + 0.1 N, "shift" 0.1 N, "embedding" N, "latent" 0.5 N, "zeros".
Layout = Iterator[tuple[str, tuple[int, ...], str]]


def linear(name: str, out_features: int, in_features: int, bias: bool = True) -> Layout:
    yield f"{name}.weight", (out_features, in_features), "weight"
    if bias:
        yield f"{name}.bias", (out_features,), "bias"


def conv(name: str, out_channels: int, in_channels: int, kernel: int) -> Layout:
    yield f"{name}.weight", (out_channels, in_channels, kernel, kernel), "weight"
    yield f"{name}.bias", (out_channels,), "bias"


def norm(name: str, channels: int, bias: bool = True) -> Layout:
    yield f"{name}.weight", (channels,), "scale"
    if bias:
        yield f"{name}.bias", (channels,), "shift"


def language_model_layout() -> Layout:
    yield "language_model.model.embed_tokens.weight", (VOCAB_SIZE, HIDDEN), "embedding"
    for index in range(LAYERS):
        layer = f"language_model.model.layers.{index}"
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield from linear(f"{layer}.self_attn.{projection}", HIDDEN, HIDDEN, bias=False)
        yield from linear(f"{layer}.mlp.gate_proj", INTERMEDIATE, HIDDEN, bias=False)
        yield from linear(f"{layer}.mlp.up_proj", INTERMEDIATE, HIDDEN, bias=False)
        yield from linear(f"{layer}.mlp.down_proj", HIDDEN, INTERMEDIATE, bias=False)
        yield from norm(f"{layer}.input_layernorm", HIDDEN, bias=False)
        yield from norm(f"{layer}.post_attention_layernorm", HIDDEN, bias=False)
    yield from norm("language_model.model.norm", HIDDEN, bias=False)
    yield from linear("language_model.lm_head", VOCAB_SIZE, HIDDEN, bias=False)


def vision_layout() -> Layout:
    tower, width, hidden = "vision_model.vision_tower", VISION_WIDTH, VISION_WIDTH * MLP_RATIO
    yield f"{tower}.pos_embed", (1, (IMAGE_SIZE // PATCH) ** 2, width), "latent"
    yield from conv(f"{tower}.patch_embed.proj", width, 3, PATCH)
    for index in range(VISION_LAYERS):
        block = f"{tower}.blocks.{index}"
        yield from norm(f"{block}.norm1", width)
        yield from linear(f"{block}.attn.qkv", 3 * width, width)
        yield from linear(f"{block}.attn.proj", width, width)
        yield from norm(f"{block}.norm2", width)
        yield from linear(f"{block}.mlp.fc1", hidden, width)
        yield from linear(f"{block}.mlp.fc2", width, hidden)
    yield from norm(f"{tower}.norm", width)
    # The attention-pool head is in every checkpoint though Janus never runs it.
    yield f"{tower}.attn_pool.latent", (1, 1, width), "latent"
    yield from linear(f"{tower}.attn_pool.q", width, width)
    yield from linear(f"{tower}.attn_pool.kv", 2 * width, width)
    yield from linear(f"{tower}.attn_pool.proj", width, width)
    yield from norm(f"{tower}.attn_pool.norm", width)
    yield from linear(f"{tower}.attn_pool.mlp.fc1", hidden, width)
    yield from linear(f"{tower}.attn_pool.mlp.fc2", width, hidden)
    yield from linear("aligner.layers.0", HIDDEN, width)
    yield from linear("aligner.layers.2", HIDDEN, HIDDEN)


def vq_res_block(name: str, in_channels: int, out_channels: int) -> Layout:
    yield from norm(f"{name}.norm1", in_channels)
    yield from conv(f"{name}.conv1", out_channels, in_channels, 3)
    yield from norm(f"{name}.norm2", out_channels)
    yield from conv(f"{name}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        yield from conv(f"{name}.nin_shortcut", out_channels, in_channels, 1)


def vq_attn_block(name: str, channels: int) -> Layout:
    yield from norm(f"{name}.norm", channels)
    for projection in ("q", "k", "v", "proj_out"):
        yield from conv(f"{name}.{projection}", channels, channels, 1)


def vq_layout() -> Layout:
    """LlamaGen VQ-16 (`gen_vision_model`): the encoder and quant_conv are stored though unused."""
    vq, levels = "gen_vision_model", len(VQ_CH_MULT)
    yield from conv(f"{vq}.encoder.conv_in", VQ_CH, 3, 3)
    channels = VQ_CH
    for level, multiplier in enumerate(VQ_CH_MULT):
        block = f"{vq}.encoder.conv_blocks.{level}"
        for index in range(VQ_RES_BLOCKS):
            yield from vq_res_block(f"{block}.res.{index}", channels, VQ_CH * multiplier)
            channels = VQ_CH * multiplier
            if level == levels - 1:
                yield from vq_attn_block(f"{block}.attn.{index}", channels)
        if level != levels - 1:
            yield from conv(f"{block}.downsample.conv", channels, channels, 3)
    yield from vq_res_block(f"{vq}.encoder.mid.0", channels, channels)
    yield from vq_attn_block(f"{vq}.encoder.mid.1", channels)
    yield from vq_res_block(f"{vq}.encoder.mid.2", channels, channels)
    yield from norm(f"{vq}.encoder.norm_out", channels)
    yield from conv(f"{vq}.encoder.conv_out", VQ_Z, channels, 3)

    yield f"{vq}.quantize.embedding.weight", (CODEBOOK_SIZE, CODEBOOK_DIM), "embedding"
    yield f"{vq}.quantize.codebook_used", (65536,), "zeros"
    yield from conv(f"{vq}.quant_conv", CODEBOOK_DIM, VQ_Z, 1)
    yield from conv(f"{vq}.post_quant_conv", VQ_Z, CODEBOOK_DIM, 1)

    # The decoder's conv_blocks.0 is the lowest resolution (widest, with attention).
    channels = VQ_CH * VQ_CH_MULT[-1]
    yield from conv(f"{vq}.decoder.conv_in", channels, VQ_Z, 3)
    yield from vq_res_block(f"{vq}.decoder.mid.0", channels, channels)
    yield from vq_attn_block(f"{vq}.decoder.mid.1", channels)
    yield from vq_res_block(f"{vq}.decoder.mid.2", channels, channels)
    for level, multiplier in enumerate(reversed(VQ_CH_MULT)):
        block = f"{vq}.decoder.conv_blocks.{level}"
        for index in range(VQ_RES_BLOCKS + 1):
            yield from vq_res_block(f"{block}.res.{index}", channels, VQ_CH * multiplier)
            channels = VQ_CH * multiplier
            if level == 0:
                yield from vq_attn_block(f"{block}.attn.{index}", channels)
        if level != levels - 1:
            yield from conv(f"{block}.upsample.conv", channels, channels, 3)
    yield from norm(f"{vq}.decoder.norm_out", channels)
    yield from conv(f"{vq}.decoder.conv_out", 3, channels, 3)


def generation_layout() -> Layout:
    yield from linear("gen_aligner.layers.0", HIDDEN, CODEBOOK_DIM)
    yield from linear("gen_aligner.layers.2", HIDDEN, HIDDEN)
    yield from linear("gen_head.output_mlp_projector", IMAGE_TOKEN_EMBED, HIDDEN)
    yield from linear("gen_head.vision_head", CODEBOOK_SIZE, IMAGE_TOKEN_EMBED)
    yield "gen_embed.weight", (CODEBOOK_SIZE, CODEBOOK_DIM), "embedding"


def checkpoint_layout() -> list[tuple[str, tuple[int, ...], str]]:
    """Every (key, shape, init) of the janus-tiny model.safetensors, in drawing order."""
    return [*vision_layout(), *vq_layout(), *generation_layout(), *language_model_layout()]


def make_weights(tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(WEIGHT_SEED)
    weights = {}
    for key, shape, init in checkpoint_layout():
        if init == "zeros":
            weights[key] = np.zeros(shape, np.float32)
            continue
        noise = rng.standard_normal(shape)
        if init == "weight":
            value = noise / np.sqrt(np.prod(shape[1:]))
        elif init == "scale":
            value = 1 + 0.1 * noise
        else:
            value = {"bias": 0.05, "shift": 0.1, "embedding": 1.0, "latent": 0.5}[init] * noise
        weights[key] = value.astype(np.float32)
    # Ids past the tokenizer and special tokens other than EOS have no text: keep greedy text off them.
    lm_head = weights["language_model.lm_head.weight"]
    lm_head[tokenizer.get_vocab_size():] = 0
    for token in JANUS_SPECIAL_TOKENS:
        if token != EOS_TOKEN:
            lm_head[tokenizer.token_to_id(token)] = 0
    return weights
