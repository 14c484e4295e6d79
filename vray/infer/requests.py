"""OpenAI-format chat requests checked and converted: messages into chat-template messages and images.

Images arrive as data: URLs, base64 or http(s) URLs of allowed hosts; each is decoded under the request limits
(count, bytes, pixels), and every problem is a RequestError naming the JSON path of the part and the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vray.data.media import load_image
from vray.errors import RequestError, VrayError
from vray.spec import ServingBlock


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_images: int
    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def of(cls, serving: ServingBlock) -> Limits:
        """The limits a deployment's serving block sets."""
        return cls(max_images=serving.maxImages, max_image_bytes=int(serving.maxImageMB * 1024 * 1024),
                   max_image_pixels=serving.maxImagePixels)


DEFAULT_LIMITS = Limits.of(ServingBlock())  # the serving block's defaults state them once

def _decode_base64(data: str, where: str, limits: Limits) -> bytes:
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(f"{where}: the image is over {limits.max_image_bytes // (1024 * 1024)} MiB; send a smaller "
                           "or more compressed image", status=413)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image is neither a data: URL, an allowed http(s) URL, nor base64") from None


def _open_checked(raw: bytes, where: str, limits: Limits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception:  # noqa: BLE001 - any decoder failure is the caller's image
        raise RequestError(f"{where}: the image cannot be decoded (not a PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    return _checked_pixels(image, where, limits)


def _checked_pixels(image: Image.Image, where: str, limits: Limits) -> Image.Image:
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise RequestError(f"{where}: the image is {w}x{h} pixels, over the limit of {limits.max_image_pixels:,}; "
                           "downscale it first", status=413)
    try:
        return image.convert("RGB")
    except Exception:  # noqa: BLE001
        raise RequestError(f"{where}: the image is truncated or corrupt") from None


def image_from_part(part: dict[str, Any], where: str, allowed_hosts: tuple[str, ...], limits: Limits) -> Image.Image:
    """The RGB image of one `image_url` part; a RequestError that says what to fix otherwise."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: an image_url part needs image_url.url")
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise RequestError(f"{where}: data: URLs must be base64-encoded (data:image/png;base64,...)")
        return _open_checked(_decode_base64(data, where, limits), where, limits)
    if url.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            raise RequestError(f"{where}: {url[:80]!r} is not a valid URL") from None
        if host not in allowed_hosts:
            raise RequestError(f"{where}: image URL host {host!r} is not allowed; send the image as a data: URL "
                               "(or ask the operator to allow the host)")
        try:
            image = load_image(url)
        except VrayError as exc:
            raise RequestError(f"{where}: {exc}") from None
        return _checked_pixels(image, where, limits)
    return _open_checked(_decode_base64(url, where, limits), where, limits)


def convert_messages(messages: Any, default_system: str | None, allowed_hosts: tuple[str, ...] = (),
                     limits: Limits = DEFAULT_LIMITS) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI messages -> (chat-template messages, images in order); the run's system prompt when none is given."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of {role, content} is required")
    out: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            role = msg.get("role") if isinstance(msg, dict) else None
            raise RequestError(f"messages[{i}]: role {role!r} is not one of system, user, assistant")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content if msg["role"] != "user" else [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content: a string or a list of parts is required")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                if msg["role"] != "user":
                    raise RequestError(f"messages[{i}].content[{j}]: images belong in user messages")
                if len(images) >= limits.max_images:
                    raise RequestError(f"messages: more than {limits.max_images} images in one request; send at most "
                                       f"{limits.max_images}")
                images.append(image_from_part(part, f"messages[{i}].content[{j}]", allowed_hosts, limits))
                parts.append({"type": "image"})
            else:
                raise RequestError(f"messages[{i}].content[{j}]: part type {kind!r} is not supported; use text or image_url")
        if msg["role"] != "user":
            out.append({"role": msg["role"], "content": "".join(p.get("text", "") for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    if out[0]["role"] != "system" and default_system:
        out.insert(0, {"role": "system", "content": default_system})
    if out[-1]["role"] != "user":
        raise RequestError("messages: the last message must come from the user")
    return out, images
