"""OpenAI-compatible routes under /v1: a translation onto the native engine operations.

Chat messages become an UnderstandRequest (system messages -> system_prompt,
image_url parts -> images), image generations a GenerateRequest.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.engine.types import GenerateRequest, TokenEvent, UnderstandRequest, UnderstandResult
from server.errors import APIError
from server.images import load_images
from server.protocol import (
    IMAGE_SIZE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    CompletionUsage,
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
    ModelCard,
    ModelList,
)
from server.routes_native import (
    check_new_tokens,
    check_placeholders,
    check_prompt_chars,
    engine_of,
    engine_request_id,
    generate_once,
    generated_images,
    open_understanding_stream,
    record_understanding,
    require_json_body,
    settings_of,
    sse_response,
    stream_items,
    stop_list,
    understand_once,
)
from server.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


def served_model_ids(request: Request) -> list[str]:
    return [engine_of(request).model_id]


def check_model(request: Request, model: str | None) -> None:
    """Unknown models are 404 model_not_found, as OpenAI answers; no model means the served one."""
    accepted = {*served_model_ids(request), settings_of(request).model}
    if model is not None and model not in accepted:
        raise APIError(
            404, f"The model {model!r} does not exist; this server serves {served_model_ids(request)[0]!r}.",
            code="model_not_found", param="model",
        )


def model_card(request: Request, model_id: str) -> ModelCard:
    return ModelCard(id=model_id, created=request.app.state.started)


def split_content(message: ChatMessage) -> tuple[list[str], list[str]]:
    """Texts and image URLs of a message, each in order."""
    if message.content is None or isinstance(message.content, str):
        return [message.content or ""], []
    texts = [part.text for part in message.content if part.type == "text"]
    urls = [part.url for part in message.content if part.type == "image_url"]
    return texts, urls


def translate_messages(
    messages: list[ChatMessage], settings: Settings
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], str | None]:
    """OpenAI messages -> (engine messages, (param, url) of each image, system prompt or None for the default)."""
    conversation: list[dict[str, Any]] = []
    references: list[tuple[str, str]] = []
    system_texts: list[str] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}].content"
        texts, urls = split_content(message)
        text = "\n".join(texts)
        if urls and message.role != "user":
            raise APIError(400, f"{param}: only user messages may hold images.", code="invalid_value", param=param)
        if message.role in ("system", "developer"):
            system_texts.append(text)
            continue
        if message.role == "user" and message.content is None:
            raise APIError(400, f"{param}: a user message needs content.", code="missing_field", param=param)
        check_placeholders(text, len(urls), param)
        parts = message.content if isinstance(message.content, list) else []
        image_params = [f"{param}[{i}].image_url" for i, part in enumerate(parts) if part.type == "image_url"]
        references += zip(image_params, urls)
        conversation.append({"role": message.role, "content": text, "images": len(urls)})
    if not conversation or conversation[-1]["role"] != "user":
        raise APIError(400, "messages: the last message must be a user message.", code="invalid_value", param="messages")
    check_prompt_chars(sum(len(m["content"]) for m in conversation) + sum(map(len, system_texts)), settings, "messages")
    return conversation, references, "\n\n".join(system_texts) if system_texts else None


@router.get("/models", response_model=ModelList, summary="The served model")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request, model_id) for model_id in served_model_ids(request)])


@router.get("/models/{model_id:path}", response_model=ModelCard, summary="One served model")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    check_model(request, model_id)
    return model_card(request, served_model_ids(request)[0])


def refuse_unsupported_answer_shapes(body: ChatCompletionRequest) -> None:
    """400 for the OpenAI fields this server cannot honour and that would change what the answer is
    (ignoring them would return something else than what was asked for)."""
    if (body.n or 1) > 1:
        raise APIError(400, "n: only n=1 is supported; send separate requests.", code="invalid_value", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs: not supported by this server.", code="invalid_value", param="logprobs")
    if body.logit_bias:
        raise APIError(400, "logit_bias: not supported by this server.", code="invalid_value", param="logit_bias")
    answer_type = (body.response_format or {}).get("type", "text")
    if answer_type != "text":
        raise APIError(400, f"response_format: type {answer_type!r} is not supported; Janus answers in plain text "
                       'only (leave response_format out or send {"type": "text"}).',
                       code="invalid_value", param="response_format")
    spoken = [modality for modality in body.modalities or [] if modality != "text"]
    if spoken:
        raise APIError(400, f"modalities: {spoken[0]!r} is not supported; Janus answers in text only.",
                       code="invalid_value", param="modalities")
    for tools, choice, name in ((body.tools, body.tool_choice, "tools"), (body.functions, body.function_call, "functions")):
        if tools and choice != "none":
            raise APIError(400, f"{name}: function calling is not supported by this server.",
                           code="invalid_value", param=name)


@router.post(
    "/chat/completions",
    dependencies=[Depends(require_json_body)],
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
    summary="Chat about images (OpenAI chat completions)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    settings = settings_of(request)
    check_model(request, body.model)
    refuse_unsupported_answer_shapes(body)
    messages, references, system_prompt = translate_messages(body.messages, settings)
    max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new_tokens = body.max_completion_tokens or body.max_tokens
    engine_request = UnderstandRequest(
        messages=messages,
        images=await load_images(references, settings),
        system_prompt=system_prompt,
        max_new_tokens=check_new_tokens(max_new_tokens, settings, max_tokens_param),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        stop=stop_list(body.stop),
        timeout=settings.request_timeout,
        request_id=engine_request_id(request),
    )
    completion_id = f"chatcmpl-{engine_request.request_id}"
    created = int(time.time())
    model_id = engine_of(request).model_id

    def usage_of(result: UnderstandResult) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            total_tokens=result.usage.total_tokens,
        )

    if not body.stream:
        result = await understand_once(request, engine_request)
        completion = ChatCompletion(
            id=completion_id, created=created, model=model_id, usage=usage_of(result),
            choices=[ChatCompletionChoice(
                message=AssistantMessage(content=result.text), finish_reason=result.finish_reason
            )],
        )
        return JSONResponse(completion.model_dump())

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    first, stream = await open_understanding_stream(request, engine_request)

    def chunk(delta: ChoiceDelta, finish_reason: str | None = None) -> dict[str, Any]:
        choice = ChatCompletionChunkChoice(delta=delta, finish_reason=finish_reason)
        return ChatCompletionChunk(id=completion_id, created=created, model=model_id, choices=[choice]).model_dump()

    async def events() -> AsyncIterator[dict[str, Any]]:
        yield chunk(ChoiceDelta(role="assistant", content=""))
        async for item in stream_items(first, stream, lambda item: isinstance(item, UnderstandResult)):
            if isinstance(item, TokenEvent):
                if item.text:
                    yield chunk(ChoiceDelta(content=item.text))
                continue
            record_understanding(request, item)
            yield chunk(ChoiceDelta(), finish_reason=item.finish_reason)
            if include_usage:
                yield ChatCompletionChunk(
                    id=completion_id, created=created, model=model_id, choices=[], usage=usage_of(item)
                ).model_dump()

    return sse_response(request, stream, events(), done_marker=True)


@router.post(
    "/images/generations",
    dependencies=[Depends(require_json_body)],
    response_model=ImagesResponse,
    summary="Generate images (OpenAI images API)",
)
async def create_images(body: ImageGenerationRequest, request: Request) -> Response:
    settings = settings_of(request)
    check_model(request, body.model)
    check_prompt_chars(len(body.prompt), settings, "prompt")
    if body.size is not None and body.size != IMAGE_SIZE:
        raise APIError(
            400, f"size: Janus draws {IMAGE_SIZE} images only; send size {IMAGE_SIZE!r} or leave it out.",
            code="invalid_value", param="size",
        )
    if body.response_format == "url":
        raise APIError(
            400, "response_format: url is not supported (this server keeps no images); use b64_json.",
            code="invalid_value", param="response_format",
        )
    image_format = body.output_format or "png"
    if body.output_compression is not None and image_format == "png":
        raise APIError(400, "output_compression: applies to output_format jpeg or webp only; PNG is lossless.",
                       code="invalid_value", param="output_compression")
    quality = 100 if body.output_compression is None else body.output_compression
    if body.background == "transparent":
        raise APIError(400, "background: Janus draws opaque images; send opaque or auto, or leave it out.",
                       code="invalid_value", param="background")
    options = {"cfg_weight": body.guidance_scale, "temperature": body.temperature, "seed": body.seed}
    engine_request = GenerateRequest(
        prompt=body.prompt,
        n=body.n or 1,
        timeout=settings.request_timeout,
        request_id=engine_request_id(request),
        **{name: value for name, value in options.items() if value is not None},
    )
    result = await generate_once(request, engine_request)
    images = [
        ImageObject(b64_json=image.b64_json, seed=image.seed)
        for image in await generated_images(result, image_format, quality)
    ]
    return JSONResponse(ImagesResponse(created=int(time.time()), data=images).model_dump(exclude_none=True))
