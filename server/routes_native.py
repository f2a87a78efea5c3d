"""Native routes POST /understand and POST /generate, and the engine operations the OpenAI routes share.

A route reads its body (JSON or multipart), builds an engine request, and
answers with JSON, a PNG, or Server-Sent Events. Failures are raised and
leave through server.errors; inside a stream they become an SSE error event.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.engine.client import EngineClient
from server.engine.types import (
    EngineError,
    EngineNotReadyError,
    GenerateRequest,
    GenerateResult,
    ProgressEvent,
    TokenEvent,
    UnderstandRequest,
    UnderstandResult,
)
from server.errors import APIError, ClientDisconnected, engine_error_parts, internal_error_body, validation_error
from server.images import encode_images_base64, image_bytes, load_images
from server.metrics import ServerMetrics
from server.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateBody,
    GeneratedImage,
    GenerateResponse,
    Timings,
    UnderstandBody,
    UnderstandResponse,
    Usage,
    json_or_multipart_body,
)
from server.settings import Settings

log = logging.getLogger("janus.routes")

T = TypeVar("T")
Model = TypeVar("Model", bound=BaseModel)
IMAGE_PLACEHOLDER = "<image_placeholder>"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

router = APIRouter(tags=["native"])


def engine_of(request: Request) -> EngineClient:
    return request.app.state.engine


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def metrics_of(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def engine_request_id(request: Request) -> str:
    return request.state.engine_request_id


def media_type_of(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def is_json_media_type(media_type: str) -> bool:
    return media_type in ("", "application/json") or (media_type.startswith("application/") and media_type.endswith("+json"))


def require_json_body(request: Request) -> None:
    """Dependency of JSON-only routes: 415 for another content type (FastAPI would answer 400)."""
    if not is_json_media_type(media_type_of(request)):
        raise APIError(
            415, f"Content-Type {media_type_of(request)!r} is not accepted; send application/json.",
            code="unsupported_media_type",
        )


def validate_body(model: type[Model], data: Any) -> Model:
    if not isinstance(data, dict):
        raise APIError(400, "The body must be a JSON object.", code="invalid_body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(), in_body=False) from exc


async def read_json_or_form(
    request: Request, model: type[Model], file_field: str | None = None
) -> tuple[Model, list[tuple[str, bytes]]]:
    """The body as `model` from JSON, multipart/form-data or a URL-encoded form, plus the files of
    `file_field` as (param, bytes)."""
    media_type = media_type_of(request)
    if is_json_media_type(media_type):
        try:
            data = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise APIError(400, f"The body is not valid JSON: {exc}.", code="invalid_json") from exc
        return validate_body(model, data), []
    if media_type not in FORM_MEDIA_TYPES:
        raise APIError(
            415,
            f"Content-Type {media_type!r} is not accepted; send application/json, multipart/form-data "
            "or application/x-www-form-urlencoded.",
            code="unsupported_media_type",
        )
    settings = settings_of(request)
    list_fields = {name for name, field in model.model_fields.items() if getattr(field.annotation, "__origin__", None) is list}
    fields: dict[str, list[str]] = {}
    files: list[tuple[str, bytes]] = []
    async with request.form(
        max_files=settings.max_images + 1, max_fields=64, max_part_size=settings.max_body_bytes
    ) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != file_field:
                    accepted = f"only {file_field!r} fields may hold files" if file_field else "this route takes no files"
                    raise APIError(400, f"{key}: {accepted}.", code="unknown_field", param=key)
                files.append((f"{file_field}[{len(files)}]", await value.read()))
            else:
                fields.setdefault(key, []).append(value)
    data = {key: values if key in list_fields or len(values) > 1 else values[0] for key, values in fields.items()}
    return validate_body(model, data), files


def check_new_tokens(max_new_tokens: int | None, settings: Settings, param: str) -> int:
    """The requested number of new tokens; not given: the default, lowered to the server's limit."""
    if max_new_tokens is None:
        return min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens_limit)
    if max_new_tokens > settings.max_new_tokens_limit:
        raise APIError(
            400, f"{param}: {max_new_tokens} is over this server's limit of {settings.max_new_tokens_limit}.",
            code="invalid_value", param=param,
        )
    return max_new_tokens


def check_prompt_chars(chars: int, settings: Settings, param: str) -> None:
    if chars > settings.max_prompt_chars:
        raise APIError(
            400, f"{param}: {chars} characters; this server accepts at most {settings.max_prompt_chars}.",
            code="too_long", param=param,
        )


def check_placeholders(text: str, images: int, param: str) -> None:
    """Images go before the text unless the text places each one with <image_placeholder>."""
    placed = text.count(IMAGE_PLACEHOLDER)
    if placed and placed != images:
        raise APIError(
            400, f"{param}: {placed} {IMAGE_PLACEHOLDER} for {images} images; use one per image or none.",
            code="invalid_value", param=param,
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def ensure_ready(engine: EngineClient) -> None:
    if not engine.ready:
        if engine.error:
            raise EngineNotReadyError(f"The model failed to load: {engine.error}", retry_after=60)
        raise EngineNotReadyError("The model is not ready (loading, or the server is stopping); retry shortly.")


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away first (uvicorn never cancels a handler)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class EngineStream:
    """Drains an engine stream in its own task, so a route can await the first item (and answer early
    failures with a proper status) while the response body reads the rest."""

    _END = object()

    def __init__(self, items: AsyncIterator[Any]):
        self._items = items
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for item in self._items:
                self._queue.put_nowait(item)
            self._queue.put_nowait(self._END)
        except Exception as exc:
            self._queue.put_nowait(exc)
        finally:
            await self._items.aclose()

    async def next(self) -> Any:
        item = await self._queue.get()
        if item is self._END:
            raise RuntimeError("the engine stream ended without a result")
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def open_stream(request: Request, items: AsyncIterator[Any]) -> tuple[Any, EngineStream]:
    """Start an engine stream and wait for its first item; failures before it raise here."""
    stream = EngineStream(items)
    try:
        first = await until_disconnected(request, stream.next())
    except BaseException:
        await stream.aclose()
        raise
    return first, stream


def sse_event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_response(
    request: Request, stream: EngineStream, events: AsyncIterator[dict[str, Any]], *, done_marker: bool
) -> StreamingResponse:
    """Server-Sent Events of `events`; a failure mid-way becomes an error event, then the stream ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for payload in events:
                yield sse_event(payload)
        except EngineError as exc:
            yield sse_event(engine_error_parts(exc)[1])
        except Exception:
            log.exception("stream of request %s failed", request.state.request_id)
            yield sse_event(internal_error_body(request.state.request_id))
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        if done_marker:
            yield sse_event("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def record_understanding(request: Request, result: UnderstandResult) -> None:
    metrics_of(request).observe_understanding(result)
    request.state.usage = result.usage.as_dict()


async def understand_once(request: Request, engine_request: UnderstandRequest) -> UnderstandResult:
    engine = engine_of(request)
    ensure_ready(engine)
    result = await until_disconnected(request, engine.understand(engine_request))
    record_understanding(request, result)
    return result


async def open_understanding_stream(
    request: Request, engine_request: UnderstandRequest
) -> tuple[TokenEvent | UnderstandResult, EngineStream]:
    engine = engine_of(request)
    ensure_ready(engine)
    return await open_stream(request, engine.understand_stream(engine_request))


async def generate_once(request: Request, engine_request: GenerateRequest) -> GenerateResult:
    engine = engine_of(request)
    ensure_ready(engine)
    result = await until_disconnected(request, engine.generate_images(engine_request))
    request.state.usage = result.usage.as_dict()
    return result


async def open_generation_stream(
    request: Request, engine_request: GenerateRequest
) -> tuple[ProgressEvent | GenerateResult, EngineStream]:
    engine = engine_of(request)
    ensure_ready(engine)
    return await open_stream(request, engine.generate_images_stream(engine_request))


async def stream_items(first: T, stream: EngineStream, is_last: Callable[[Any], bool]) -> AsyncIterator[Any]:
    item = first
    while True:
        yield item
        if is_last(item):
            return
        item = await stream.next()


def usage_body(result: UnderstandResult | GenerateResult) -> Usage:
    return Usage(**result.usage.as_dict())


def timings_body(result: UnderstandResult | GenerateResult) -> Timings:
    return Timings(**result.timings.as_dict())


async def generated_images(result: GenerateResult, image_format: str = "png",
                           quality: int = 100) -> list[GeneratedImage]:
    encoded = await encode_images_base64(result.images, image_format, quality)
    return [GeneratedImage(b64_json=b64, seed=seed) for b64, seed in zip(encoded, result.seeds)]


UNDERSTAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": UnderstandResponse, "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}
GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": GenerateResponse,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
}


@router.post(
    "/understand",
    summary="Answer a question about images",
    openapi_extra=json_or_multipart_body(UnderstandBody, file_field="image"),
    responses=UNDERSTAND_RESPONSES,
)
async def understand(request: Request) -> Response:
    settings = settings_of(request)
    body, files = await read_json_or_form(request, UnderstandBody, file_field="image")
    references: list[tuple[str, str | bytes]] = [(f"images[{i}]", image) for i, image in enumerate(body.images)]
    if body.image is not None:
        references.append(("image", body.image))
    references += files
    check_prompt_chars(len(body.question) + len(body.system_prompt or ""), settings, "question")
    check_placeholders(body.question, len(references), "question")
    images = await load_images(references, settings)
    engine_request = UnderstandRequest(
        messages=[{"role": "user", "content": body.question, "images": len(images)}],
        images=images,
        system_prompt=body.system_prompt,
        max_new_tokens=check_new_tokens(
            body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None, settings, "max_new_tokens"
        ),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=stop_list(body.stop),
        timeout=settings.request_timeout,
        request_id=engine_request_id(request),
    )
    request_id = engine_request.request_id
    if not body.stream:
        result = await understand_once(request, engine_request)
        answer = UnderstandResponse(
            id=request_id, text=result.text, finish_reason=result.finish_reason,
            usage=usage_body(result), timings=timings_body(result),
        )
        return JSONResponse(answer.model_dump())

    first, stream = await open_understanding_stream(request, engine_request)

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for item in stream_items(first, stream, lambda item: isinstance(item, UnderstandResult)):
            if isinstance(item, TokenEvent):
                if item.text:
                    yield {"id": request_id, "text": item.text}
                continue
            record_understanding(request, item)
            yield {
                "id": request_id,
                "finish_reason": item.finish_reason,
                "usage": usage_body(item).model_dump(),
                "timings": timings_body(item).model_dump(),
            }

    return sse_response(request, stream, events(), done_marker=False)


@router.post(
    "/generate",
    summary="Generate 384x384 images from a prompt",
    openapi_extra=json_or_multipart_body(GenerateBody),
    responses=GENERATE_RESPONSES,
)
async def generate(request: Request) -> Response:
    settings = settings_of(request)
    body, _ = await read_json_or_form(request, GenerateBody)
    check_prompt_chars(len(body.prompt), settings, "prompt")
    if body.response_format == "png" and (body.n > 1 or body.stream):
        reason = "n must be 1" if body.n > 1 else "it cannot be streamed"
        raise APIError(
            400, f"response_format: png answers with one raw image, so {reason}; use b64_json.",
            code="invalid_value", param="response_format",
        )
    if body.preview_every and not body.stream:
        raise APIError(400, "preview_every: previews are sent in the stream; set stream: true.",
                       code="invalid_value", param="preview_every")
    engine_request = GenerateRequest(
        prompt=body.prompt,
        n=body.n,
        cfg_weight=body.cfg_weight,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        preview_every=body.preview_every,
        timeout=settings.request_timeout,
        request_id=engine_request_id(request),
    )
    request_id = engine_request.request_id
    if not body.stream:
        result = await generate_once(request, engine_request)
        if body.response_format == "png":
            png = await anyio.to_thread.run_sync(image_bytes, result.images[0])
            return Response(png, media_type="image/png", headers={"X-Seed": str(result.seeds[0])})
        answer = GenerateResponse(
            id=request_id, images=await generated_images(result),
            usage=usage_body(result), timings=timings_body(result),
        )
        return JSONResponse(answer.model_dump())

    first, stream = await open_generation_stream(request, engine_request)

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for item in stream_items(first, stream, lambda item: isinstance(item, GenerateResult)):
            if isinstance(item, ProgressEvent):
                progress = {"id": request_id, "step": item.step, "total": item.total}
                if item.previews is not None:
                    progress["previews"] = [base64.b64encode(image_bytes(preview)).decode("ascii")
                                            for preview in item.previews]  # 24x24 PNGs: microseconds
                yield progress
                continue
            request.state.usage = item.usage.as_dict()
            yield {
                "id": request_id,
                "images": [image.model_dump() for image in await generated_images(item)],
                "usage": usage_body(item).model_dump(),
                "timings": timings_body(item).model_dump(),
            }

    return sse_response(request, stream, events(), done_marker=False)
