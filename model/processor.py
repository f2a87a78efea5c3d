"""Janus prompts in, token ids and pixels out: tokenizer, chat template, image preprocessing.

A port of the reference `VLChatProcessor` (deepseek-ai/Janus) on the
`tokenizers` library alone. See JANUS.md §3-4 and the golden README.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from tokenizers import AddedToken, Tokenizer
from tokenizers.processors import TemplateProcessing

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
JANUS_ROLES = ("User", "Assistant")
JANUS_PRO_ROLES = ("<|User|>", "<|Assistant|>")

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
IMAGE_START_TOKEN = "<begin_of_image>"
IMAGE_END_TOKEN = "<end_of_image>"
# The Janus added tokens in the order the released tokenizers give them ids.
JANUS_SPECIAL_TOKENS = (
    BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN,
    "<patch_placeholder>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
    "<|User|>", "<|Assistant|>",
)
# BOS, EOS and pad carry meaning the model was trained with: never invent them.
_ADDABLE_SPECIAL_TOKENS = JANUS_SPECIAL_TOKENS[3:]

DEFAULT_IMAGE_SIZE = 384
DEFAULT_MIN_SIZE = 14
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
DEFAULT_NUM_IMAGE_TOKENS = 576

_PREPROCESSING_FILES = ("processor_config.json", "preprocessor_config.json", "image_preprocessor_config.json")


class ProcessorError(ValueError):
    """The folder's tokenizer or preprocessing files cannot serve a Janus model."""


@dataclasses.dataclass
class UnderstandingInputs:
    prompt: str                # the sft string, before image-token expansion
    input_ids: np.ndarray      # [L] int64, BOS once, each image as begin + N x image + end
    image_mask: np.ndarray     # [L] bool, True at the N image positions of every image
    pixel_values: np.ndarray   # [n_images, 3, S, S] float32


class JanusProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        add_bos: bool = True,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        roles: Sequence[str] = JANUS_ROLES,
        image_size: int = DEFAULT_IMAGE_SIZE,
        min_size: int = DEFAULT_MIN_SIZE,
        image_mean: Sequence[float] | None = DEFAULT_IMAGE_MEAN,
        image_std: Sequence[float] = DEFAULT_IMAGE_STD,
        rescale_factor: float = 1.0 / 255.0,
        do_normalize: bool = True,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        vocab_size: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        if len(roles) != 2 or not all(isinstance(role, str) and role for role in roles):
            raise ProcessorError(f"roles must be two non-empty strings (user, assistant), got {roles!r}")
        self.roles = tuple(roles)

        missing = [token for token in _ADDABLE_SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            # The reference processor adds <image_placeholder> the same way when the tokenizer lacks it.
            tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])

        self.bos_id = self._require_id(bos_token, "BOS")
        self.eos_id = self._require_id(eos_token, "EOS")
        if pad_token == eos_token:
            raise ProcessorError("the pad token is the EOS token; Janus needs its own pad token for CFG")
        self.pad_id = self._require_id(pad_token, "pad")
        self.image_id = self._require_id(IMAGE_TOKEN, "image placeholder")
        self.image_start_id = self._require_id(IMAGE_START_TOKEN, "image start")
        self.image_end_id = self._require_id(IMAGE_END_TOKEN, "image end")
        if vocab_size is not None:
            for name in ("bos_id", "eos_id", "pad_id", "image_id", "image_start_id", "image_end_id"):
                if getattr(self, name) >= vocab_size:
                    raise ProcessorError(
                        f"{name} {getattr(self, name)} is outside the model's vocabulary of {vocab_size}"
                    )

        # So that a plain tokenizer.encode(text) agrees with this processor: BOS exactly as add_bos says.
        if add_bos:
            tokenizer.post_processor = TemplateProcessing(
                single=f"{bos_token}:0 $A:0",
                pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
                special_tokens=[(bos_token, self.bos_id)],
            )
        else:
            tokenizer.post_processor = TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])

        self.image_size = int(image_size)
        self.min_size = int(min_size)
        if not 0 < self.min_size <= self.image_size:
            raise ProcessorError(f"need 0 < min_size <= image_size, got {min_size} and {image_size}")
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = np.asarray(image_mean if image_mean is not None else DEFAULT_IMAGE_MEAN, np.float32)
        self.image_std = np.asarray(image_std, np.float32)
        # The reference derives the padding colour from image_mean, whatever background_color says.
        self.background_color = (
            tuple(int(x * 255) for x in image_mean) if image_mean is not None else (127, 127, 127)
        )
        self.num_image_tokens = int(num_image_tokens)

    @classmethod
    def from_folder(cls, folder: str | Path, roles: Sequence[str] | None = None) -> "JanusProcessor":
        """Load tokenizer.json and the *_config.json files of a checkpoint folder (HF or PaddleNLP).

        `roles`: the chat roles, e.g. JANUS_PRO_ROLES for Janus-Pro; default: the
        "chat_roles" entry of config.json (as JanusConfig reads it), else JANUS_ROLES (Janus-1.3B).
        """
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ProcessorError(f"no tokenizer.json in {folder}")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:
            raise ProcessorError(f"cannot read {tokenizer_file}: {error}") from error

        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        special_tokens_map = _read_json(folder / "special_tokens_map.json")
        preprocessing: dict[str, Any] = {}
        for name in _PREPROCESSING_FILES:
            preprocessing.update(_read_json(folder / name))
        model_config = _read_json(folder / "config.json")
        language_config = model_config.get("language_config") or {}

        def token_string(key: str, default: str) -> str:
            value = tokenizer_config.get(key) or special_tokens_map.get(key) or default
            return value["content"] if isinstance(value, dict) else value

        eos_token = token_string("eos_token", EOS_TOKEN)
        pad_token = PAD_TOKEN
        if tokenizer.token_to_id(PAD_TOKEN) is None:
            pad_token = token_string("pad_token", "")
            if not pad_token or pad_token == eos_token:
                raise ProcessorError(
                    f"the tokenizer in {folder} has no pad token ({PAD_TOKEN!r} is missing and no other "
                    "pad_token is configured); padding with EOS would spoil CFG images"
                )

        return cls(
            tokenizer,
            add_bos=bool(tokenizer_config.get("add_bos_token", True)),
            bos_token=token_string("bos_token", BOS_TOKEN),
            eos_token=eos_token,
            pad_token=pad_token,
            roles=tuple(roles or model_config.get("chat_roles") or JANUS_ROLES),
            image_size=preprocessing.get("image_size", DEFAULT_IMAGE_SIZE),
            min_size=preprocessing.get("min_size", DEFAULT_MIN_SIZE),
            image_mean=preprocessing.get("image_mean", DEFAULT_IMAGE_MEAN),
            image_std=preprocessing.get("image_std", DEFAULT_IMAGE_STD),
            rescale_factor=preprocessing.get("rescale_factor", 1.0 / 255.0),
            do_normalize=preprocessing.get("do_normalize", True),
            num_image_tokens=preprocessing.get("num_image_tokens", DEFAULT_NUM_IMAGE_TOKENS),
            vocab_size=language_config.get("vocab_size"),
        )

    def _require_id(self, token: str, what: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ProcessorError(f"the tokenizer has no {what} token {token!r}")
        return token_id

    def render_chat(self, messages: Sequence[dict[str, Any]], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> str:
        """The sft string of a conversation ('deepseek' template), ending with the empty assistant turn.

        `messages`: [{"role": "user"|"assistant"|"system", "content": str, "images": int}].
        System messages replace `system_prompt`; None means DEFAULT_SYSTEM_PROMPT, "" none.
        A message with images gets one "<image_placeholder>\\n" per image before its
        text, unless the text already holds exactly that many placeholders.
        """
        system_parts: list[str] = []
        turns: list[tuple[str, str]] = []
        for index, message in enumerate(messages):
            role = message.get("role")
            content = message.get("content") or ""
            if not isinstance(content, str):
                raise ValueError(f"messages[{index}].content must be a string")
            if role == "system":
                system_parts.append(content)
            elif role in ("user", "assistant"):
                turns.append((role, _with_image_placeholders(content, int(message.get("images") or 0), index)))
            else:
                raise ValueError(f"messages[{index}].role must be 'system', 'user' or 'assistant', got {role!r}")
        if system_parts:
            system_prompt = "\n\n".join(system_parts)
        elif system_prompt is None:
            system_prompt = DEFAULT_SYSTEM_PROMPT
        if not turns or turns[-1][0] != "assistant" or turns[-1][1].strip():
            turns.append(("assistant", ""))

        user_role, assistant_role = self.roles
        text = system_prompt + "\n\n" if system_prompt else ""
        for role, content in turns:
            name = user_role if role == "user" else assistant_role
            content = content.strip()
            if not content:
                text += name + ":"
            elif role == "user":
                text += f"{name}: {content}\n\n"
            else:
                text += f"{name}: {content}{self.eos_token}"
        return text.strip()

    def encode(self, text: str, add_bos: bool | None = None) -> np.ndarray:
        """Token ids [L] int64 of `text`; BOS first when add_bos (default: the tokenizer config's add_bos_token)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids = [self.bos_id, *ids]
        return np.asarray(ids, dtype=np.int64)

    def encode_understanding(
        self,
        messages: Sequence[dict[str, Any]],
        images: Sequence[Image.Image] = (),
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> UnderstandingInputs:
        prompt = self.render_chat(messages, system_prompt)
        ids = self.encode(prompt)
        positions = np.flatnonzero(ids == self.image_id)
        if len(positions) != len(images):
            raise ValueError(
                f"the conversation has {len(positions)} image placeholder(s) but {len(images)} image(s) were given"
            )
        image_block = np.concatenate(
            [[self.image_start_id], np.full(self.num_image_tokens, self.image_id), [self.image_end_id]]
        ).astype(np.int64)
        pieces, start = [], 0
        for position in positions:
            pieces += [ids[start:position], image_block]
            start = position + 1
        pieces.append(ids[start:])
        input_ids = np.concatenate(pieces).astype(np.int64)
        pixel_values = np.zeros((len(images), 3, self.image_size, self.image_size), np.float32)
        for index, image in enumerate(images):
            pixel_values[index] = self.preprocess_image(image)
        return UnderstandingInputs(prompt, input_ids, input_ids == self.image_id, pixel_values)

    def encode_generation(self, prompt: str) -> np.ndarray:
        """[L] int64: BOS + "User: {prompt}\\n\\nAssistant:<begin_of_image>" (no system prompt)."""
        if IMAGE_TOKEN in prompt:
            raise ValueError(f"a text-to-image prompt cannot contain {IMAGE_TOKEN}")
        text = self.render_chat([{"role": "user", "content": prompt}], system_prompt="")
        return self.encode(text + IMAGE_START_TOKEN)

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """[3, S, S] float32: `resize_and_pad`, scaled to [0, 1], normalised."""
        pixels = (self.resize_and_pad(image).astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean, std = self.image_mean[:, None, None], self.image_std[:, None, None]
            pixels = (pixels - mean) / std
        return pixels

    def resize_and_pad(self, image: Image.Image) -> np.ndarray:
        """[3, S, S] uint8: RGB, long side to S (bicubic), centred on the mean colour."""
        rgb = to_rgb(image)
        width, height = rgb.size
        if width <= 0 or height <= 0:
            raise ValueError(f"image has no pixels ({width}x{height})")
        long_side = max(width, height)
        size = (
            max(int(width / long_side * self.image_size), self.min_size),
            max(int(height / long_side * self.image_size), self.min_size),
        )
        # = torchvision.transforms.functional.resize(BICUBIC, antialias) on a PIL image, as the reference.
        resized = rgb.resize(size, Image.Resampling.BICUBIC)
        side = max(size)
        canvas = Image.new("RGB", (side, side), self.background_color)
        canvas.paste(resized, ((side - size[0]) // 2, (side - size[1]) // 2))
        return np.ascontiguousarray(np.asarray(canvas).transpose(2, 0, 1))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self.tokenizer, skip_special_tokens)


class IncrementalDecoder:
    """Token ids in one at a time, text out only once its characters are complete.

    Byte-level BPE can split a UTF-8 character across tokens; text whose
    decoding ends in U+FFFD is held back until a later token completes it (or
    `finish()` gives it up as the full decode would). Each step decodes a short
    window from the last complete boundary, so the pieces add up to decode(all).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_start = 0  # window start: the tokens before the last emitted piece
        self._read_start = 0    # tokens before this index have all been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (often "")."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(token_id) for token_id in token_ids)

    def finish(self) -> str:
        """Return whatever is held back, incomplete characters as U+FFFD."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self._decode(self.ids[self._prefix_start:self._read_start])
        window = self._decode(self.ids[self._prefix_start:])
        if len(window) <= len(done) or (window.endswith("\ufffd") and not final):
            return ""
        piece = window[len(done):]
        self._prefix_start, self._read_start = self._read_start, len(self.ids)
        self.text += piece
        return piece


def to_rgb(image: Image.Image) -> Image.Image:
    """`image.convert("RGB")` as the reference does (alpha dropped, grey replicated, 16-bit clipped by PIL).

    Modes PIL cannot take straight to RGB (e.g. premultiplied "La") go through an alpha mode first.
    """
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        pass
    for intermediate in ("LA", "RGBA"):
        try:
            return image.convert(intermediate).convert("RGB")
        except ValueError:
            continue
    raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB")


def _with_image_placeholders(content: str, n_images: int, index: int) -> str:
    present = content.count(IMAGE_TOKEN)
    if present == 0 and n_images > 0:
        return f"{IMAGE_TOKEN}\n" * n_images + content
    if present != n_images:
        raise ValueError(
            f"messages[{index}] has {n_images} image(s) but its text contains {present} {IMAGE_TOKEN}; "
            "either leave the placeholders out or write one per image"
        )
    return content


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise ProcessorError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ProcessorError(f"{path} does not hold a JSON object")
    return data
