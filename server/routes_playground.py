"""The playground: GET / and GET /playground serve one page (server/static/) to try the model in a browser.

The page and its script and style sheet are open even with an API key: they hold no secret and no
request content; the model routes the page calls need the key, which the user types into the page.
Nothing outside this server is fetched, and the Content-Security-Policy holds the page to that.
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

STATIC = Path(__file__).parent / "static"
ASSETS = {
    "playground.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# same origin only: the page's script, its styles, images it is given (data:, blob:) and this server's API
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["playground"], include_in_schema=False)


@cache
def asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def asset_response(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


@router.get("/")
@router.get("/playground")
async def playground() -> Response:
    return asset_response("playground.html")


@router.get("/playground/playground.js")
async def playground_script() -> Response:
    return asset_response("playground.js")


@router.get("/playground/playground.css")
async def playground_styles() -> Response:
    return asset_response("playground.css")
