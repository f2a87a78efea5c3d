"""Operations routes: liveness, readiness and Prometheus metrics (open even when an API key is set)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.errors import error_response, retry_after_headers
from server.routes_native import engine_of, metrics_of

NOT_READY_RETRY_AFTER = 5.0

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: 200 while the process serves HTTP")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready", summary="Readiness: 200 once the model is loaded and a worker is up, else 503")
async def ready(request: Request) -> JSONResponse:
    engine = engine_of(request)
    if not engine.ready:
        failure = engine.error
        if failure:
            message = f"The model failed to load: {failure}"
        else:
            problems = engine.loading_problems
            message = "The model is not loaded yet, or no worker is up" + (
                f": {'; '.join(problems)}." if problems else ".")
        return error_response(
            503, message, code="model_load_failed" if failure else "not_ready",
            headers=retry_after_headers(NOT_READY_RETRY_AFTER),
        )
    return JSONResponse({"status": "ready", "model": engine.model_id, "kv_cache": engine.caches,
                         "workers": engine.runtimes})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    body, content_type = metrics_of(request).render()
    return Response(body, media_type=content_type)
