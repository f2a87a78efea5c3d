"""Decoding and checking uploaded images, and encoding generated ones (PNG, or JPEG / WEBP on request).

Every failure is an APIError 400 naming the field (`param`) that held the image.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import warnings
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from server.errors import APIError
from server.settings import Settings

# the pixel count is checked before decoding (decode_image_bytes), so PIL's own warning is noise
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# formats a photo or screenshot comes in; others (EPS, PSD, ...) widen the attack surface for nothing
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def invalid_image(param: str, reason: str, code: str = "invalid_image") -> APIError:
    return APIError(400, f"{param}: {reason}", code=code, param=param)


def decode_image_bytes(data: bytes, *, max_pixels: int, param: str) -> Image.Image:
    """Bytes of an image file -> a fully loaded RGB image; the pixel count is checked before decoding."""
    if not data:
        raise invalid_image(param, "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise invalid_image(
                    param, f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels", "image_too_large"
                )
            opened.load()
            return opened.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError as exc:
        raise invalid_image(param, f"the image is too large to decode ({exc})", "image_too_large") from exc
    except UnidentifiedImageError as exc:
        formats = ", ".join(ACCEPTED_FORMATS)
        raise invalid_image(param, f"the data is not an image in a supported format ({formats})") from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on broken files
        raise invalid_image(param, f"the image could not be decoded: {exc}") from exc


def decode_base64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid_image(param, f"the image is not valid base64 ({exc})") from exc


def decode_data_url(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise invalid_image(param, "a data URL needs a comma between its header and its data")
    media_type, *options = header.removeprefix("data:").split(";")
    if media_type and not media_type.startswith("image/"):
        raise invalid_image(param, f"the data URL's media type is {media_type!r}, not image/*")
    if "base64" not in options:
        raise invalid_image(param, "only base64 data URLs are accepted (data:image/png;base64,...)")
    return decode_base64(payload, param)


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


async def fetch_remote_image(url: str, settings: Settings, param: str) -> bytes:
    """GET an http(s) image: no redirects, a time and size cap, and no private hosts unless allowed."""
    if not settings.allow_remote_images:
        raise invalid_image(
            param,
            "http(s) image URLs are disabled on this server; send the image as a data URL or base64",
            "remote_image_refused",
        )
    parts = urlsplit(url)
    if not parts.hostname:
        raise invalid_image(param, "the image URL has no host", "remote_image_refused")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise invalid_image(param, f"the image host does not resolve ({exc})", "remote_image_failed") from exc
    address = infos[0][4][0]
    if not settings.allow_private_image_hosts and not all(is_public_address(info[4][0]) for info in infos):
        raise invalid_image(
            param, "the image host is a private, loopback or link-local address", "remote_image_refused"
        )
    # connect to the address just checked, so a second DNS answer cannot point elsewhere
    target = httpx.URL(url).copy_with(host=address)
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    headers = {"Host": parts.netloc.rpartition("@")[2]}
    limit = settings.max_body_bytes
    try:
        async with asyncio.timeout(settings.remote_image_timeout):
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
                async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        raise invalid_image(param, "the image URL redirects; redirects are not followed",
                                            "remote_image_failed")
                    if response.status_code != 200:
                        raise invalid_image(param, f"fetching the image gave HTTP {response.status_code}",
                                            "remote_image_failed")
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise invalid_image(param, f"the remote image is over {limit} bytes", "image_too_large")
                    return bytes(data)
    except TimeoutError as exc:
        raise invalid_image(
            param, f"fetching the image took over {settings.remote_image_timeout:g} s", "remote_image_failed"
        ) from exc
    except httpx.HTTPError as exc:
        raise invalid_image(param, f"fetching the image failed ({exc})", "remote_image_failed") from exc


async def load_image(reference: str | bytes, settings: Settings, param: str) -> Image.Image:
    """An uploaded file's bytes, a data URL, base64 text or an http(s) URL -> a checked RGB image."""
    if isinstance(reference, bytes):
        data = reference
    elif reference.startswith("data:"):
        data = decode_data_url(reference, param)
    elif reference.startswith(("http://", "https://")):
        data = await fetch_remote_image(reference, settings, param)
    else:
        data = decode_base64(reference, param)
    return await run_in_threadpool(decode_image_bytes, data, max_pixels=settings.max_image_pixels, param=param)


async def load_images(references: list[tuple[str, str | bytes]], settings: Settings) -> list[Image.Image]:
    """(param, reference) pairs -> images, at most settings.max_images of them."""
    if len(references) > settings.max_images:
        raise APIError(
            400,
            f"{len(references)} images; at most {settings.max_images} per request",
            code="too_many_images",
            param=references[settings.max_images][0].split("[")[0],
        )
    return [await load_image(reference, settings, param) for param, reference in references]


def image_bytes(pixels: np.ndarray, image_format: str = "png", quality: int = 100) -> bytes:
    """An RGB uint8 image as a PNG, or as a JPEG or WEBP file of `quality` (0-100, PIL's scale)."""
    buffer = io.BytesIO()
    options = {} if image_format == "png" else {"quality": quality}
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


async def encode_images_base64(images: list[np.ndarray], image_format: str = "png", quality: int = 100) -> list[str]:
    return await run_in_threadpool(
        lambda: [base64.b64encode(image_bytes(image, image_format, quality)).decode("ascii") for image in images])
