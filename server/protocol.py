"""Request and response schemas of every HTTP route: native, OpenAI-compatible and the error body.

The native and OpenAI request models share parameter names and defaults where
the two APIs mean the same thing; their descriptions are what /docs shows.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

SEED_MAX = 2**63 - 1
MAX_IMAGES_PER_GENERATION = 16
IMAGE_SIZE = "384x384"
DEFAULT_MAX_NEW_TOKENS = 512

StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None

STOP_DOC = "A string or up to 4 strings; generation ends before the first of them and the text excludes it."
SEED_DOC = "Seed of the sampler; the same seed and parameters give the same output. Absent: random."
PRESENCE_PENALTY_DOC = ("Subtracted from the logit of every token the answer already holds (as OpenAI defines it; "
                        "the prompt does not count). Default 0.")
FREQUENCY_PENALTY_DOC = ("Subtracted from a token's logit once per time the answer already holds it (as OpenAI "
                         "defines it). Default 0.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    images: int = 0


class Timings(BaseModel):
    """Seconds spent in each phase."""

    queue: float
    prefill: float
    decode: float
    vq_decode: float
    total: float
    first_token: float | None = None


class UnderstandBody(BaseModel):
    """POST /understand: images and a question -> text (JSON, or multipart with `image` file fields)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        default_factory=list,
        description="Images as base64 or `data:image/...;base64,` URLs (http(s) URLs only if the server allows them). "
        "In multipart, send files in `image` fields instead.",
    )
    image: str | None = Field(None, description="Shorthand for one image; added after `images`.")
    question: str = Field(
        min_length=1,
        description="The user's question. The images go before it unless it contains `<image_placeholder>` "
        "once per image.",
    )
    system_prompt: str | None = Field(
        None, description="Replaces the model's default understanding system prompt; an empty string means none."
    )
    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS, ge=1, description="Most tokens to generate; at most the server's limit."
    )
    temperature: float = Field(0.0, ge=0, le=2, description="0 is greedy decoding, like the reference code.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 is off.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 is off.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description=PRESENCE_PENALTY_DOC)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description=FREQUENCY_PENALTY_DOC)
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description=SEED_DOC)
    stop: Stop = Field(None, description=STOP_DOC)
    stream: bool = Field(False, description="Answer with Server-Sent Events: text pieces, then a final event.")


class UnderstandResponse(BaseModel):
    id: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings


class GenerateBody(BaseModel):
    """POST /generate: prompt -> 384x384 images (JSON or multipart form fields)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What to draw.")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_GENERATION, description="How many images.")
    cfg_weight: float = Field(5.0, ge=0, le=20, description="Classifier-free guidance weight.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature of image tokens; 0 is greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely image tokens; 0 is off.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass; 1 is off.")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Seed of the first image; each image reports its own seed."
    )
    response_format: Literal["b64_json", "png"] = Field(
        "b64_json", description="`b64_json`: JSON with base64 PNGs; `png`: the raw image/png (n=1 only)."
    )
    stream: bool = Field(False, description="Answer with Server-Sent Events of progress, then the images.")
    preview_every: int = Field(
        0, ge=0, le=576,
        description="Streamed only: every this many of the 576 steps, the progress event also carries `previews`, "
        "a 24x24 PNG per image (one pixel per image token, grey where none is sampled yet; a colour per token "
        "fitted to the VQ decoder), to be scaled up. 0: no previews.")


class GeneratedImage(BaseModel):
    b64_json: str = Field(description="The PNG, base64.")
    seed: int = Field(description="Send n=1 with this seed to get this image again.")


class GenerateResponse(BaseModel):
    id: str
    images: list[GeneratedImage]
    usage: Usage
    timings: Timings


class ImageURL(BaseModel):
    url: str = Field(description="`data:image/...;base64,...` (http(s) only if the server allows it).")
    detail: str | None = None


class ContentPart(BaseModel):
    """One part of a message: {"type": "text", "text"} or {"type": "image_url", "image_url": {"url"}}."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None

    @model_validator(mode="after")
    def _has_its_field(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs `image_url`")
        return self

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Fields OpenAI defines that this server does not use are ignored."""

    model: str | None = Field(None, description="The served model id (GET /v1/models); may be left out.")
    messages: list[ChatMessage] = Field(
        min_length=1,
        description="System messages replace the Janus system prompt (none: the default one). "
        "A message's images go before its text unless the text holds `<image_placeholder>` per image.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description=f"Most tokens to generate; default {DEFAULT_MAX_NEW_TOKENS} or the server's limit."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Same as max_tokens; wins if both are set.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Default 1 (OpenAI's), i.e. sampling; 0 is greedy like the reference code."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Default 1.")
    top_k: int | None = Field(None, ge=0, description="Extension: sample among the k most likely tokens; 0 is off.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description=SEED_DOC)
    stop: Stop = Field(None, description=STOP_DOC)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description=PRESENCE_PENALTY_DOC)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description=FREQUENCY_PENALTY_DOC)
    n: int | None = Field(None, ge=1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = Field(None, description="Not supported: true is refused.")
    # Fields that would change what the answer is; refused rather than ignored.
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: a non-empty map is refused.")
    response_format: dict[str, Any] | None = Field(
        None, description='Only {"type": "text"}: Janus has no JSON or schema mode; other types are refused.')
    tools: list[dict[str, Any]] | None = Field(
        None, description='Not supported: tools are refused unless tool_choice is "none".')
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = Field(
        None, description='Not supported (legacy tools): refused unless function_call is "none".')
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = Field(None, description='Only ["text"]: Janus does not speak; audio is refused.')


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(BaseModel):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: CompletionUsage | None = None


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations. Fields OpenAI defines that this server does not use are ignored."""

    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="The served model id (GET /v1/models); may be left out.")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES_PER_GENERATION, description="Default 1.")
    size: str | None = Field(None, description=f"Only {IMAGE_SIZE}, which is also the default.")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="Only b64_json (the default): this server does not host images."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg and webp only: their quality, 0-100 (default 100).")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="Janus draws opaque images: transparent is refused.")
    guidance_scale: float | None = Field(None, ge=0, le=20, description="Extension: CFG weight, default 5.")
    temperature: float | None = Field(None, ge=0, le=2, description="Extension: default 1; 0 is greedy.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Extension: seed of the first image.")


class ImageObject(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int = Field(description="Extension: send n=1 with this seed to get this image again.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deepseek-ai"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def multipart_schema(model: type[BaseModel], file_field: str | None) -> dict[str, Any]:
    """The JSON schema of `model` as form fields, with `file_field` as repeated binary file fields."""
    schema = model.model_json_schema()
    properties = dict(schema["properties"])
    if file_field is not None:
        properties.pop("images", None)
        properties[file_field] = {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Image files; repeat the field for more images.",
        }
    return {**schema, "properties": properties, "title": f"{model.__name__}Form"}


def json_or_multipart_body(model: type[BaseModel], file_field: str | None = None) -> dict[str, Any]:
    """openapi_extra for a route that reads `model` as JSON, multipart/form-data or a URL-encoded form
    (text fields only, as `curl -d` and HTML forms send) itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema()},
                "multipart/form-data": {"schema": multipart_schema(model, file_field)},
                "application/x-www-form-urlencoded": {"schema": multipart_schema(model, None)},
            },
        }
    }


def apply_limits(openapi: dict[str, Any], limits: dict[str, dict[str, int]]) -> None:
    """Write a server's settings into its OpenAPI document: limits["max_tokens"] = {"maximum": 4096}
    sets that keyword on every property of that name (in each branch of an anyOf that can take it)."""
    keyword_types = {"maximum": "integer", "maxLength": "string", "maxItems": "array"}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                for keyword, value in limits.get(name, {}).items():
                    for branch in prop.get("anyOf", [prop]):
                        if branch.get("type") == keyword_types[keyword]:
                            branch[keyword] = min(value, branch.get(keyword, value))
                    if keyword == "maximum" and isinstance(prop.get("default"), int):
                        prop["default"] = min(prop["default"], value)
            for child in node.values():
                visit(child)
        elif isinstance(node, list):
            for child in node:
                visit(child)

    visit(openapi)
