"""OpenAI-format chat requests checked and converted: messages into chat-template messages and images.

Images arrive as data: URLs, base64 or http(s) URLs of allowed hosts; each is read under the request limits
(count, bytes, and pixels from its header, before any decoding), and every problem is a RequestError naming the
JSON path of the part and the fix. `Limits` also bounds what one request may cost the model: prompt plus
completion tokens, and the pixels the processor resizes one image to.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vray.archs.registry import Architecture
from vray.data.media import IMAGE_FORMATS
from vray.errors import RequestError
from vray.spec import ServingBlock

# chat_template_kwargs a request may set, and the type of each: switches of the shipped templates, nothing that
# replaces the template, the system prompt or the tokenization
TEMPLATE_SWITCHES: dict[str, type] = {"enable_thinking": bool, "add_vision_id": bool}
URL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and what it may cost the model."""

    max_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_model_len: int | None = None  # prompt plus completion tokens; None: no bound (local use)

    @classmethod
    def of(cls, serving: ServingBlock) -> Limits:
        """The limits a deployment's serving block sets."""
        return cls(max_images=serving.maxImages, max_image_bytes=int(serving.maxImageMB * 1024 * 1024),
                   max_image_pixels=serving.maxImagePixels, max_model_len=serving.maxModelLen)

    def image_tokens(self) -> int | None:
        """Visual tokens one image may become: a full request of `max_images` images fits in `max_model_len`."""
        return None if self.max_model_len is None else self.max_model_len // self.max_images

    def processor_pixels(self, arch: Architecture) -> int | None:
        """The most pixels the serving processor resizes one image to (its `max_pixels`), from `image_tokens`."""
        from vray.archs.vision import pixels_for_tokens

        tokens = self.image_tokens()
        return None if tokens is None else pixels_for_tokens(arch, tokens)

    def check_max_tokens(self, max_tokens: int, default: bool) -> None:
        """Refuse, before any encoding, a `max_tokens` that leaves no room for any prompt."""
        if self.max_model_len is not None and not default and max_tokens >= self.max_model_len:
            raise RequestError(f"max_tokens: {max_tokens:,} leaves no room for the prompt in serving.maxModelLen "
                               f"({self.max_model_len:,}); ask for fewer tokens")

    def check_text(self, text_chars: int, chars_per_token: int) -> None:
        """Refuse, before tokenizing, more text than `max_model_len` tokens can spell (`chars_per_token`: the
        tokenizer's longest token; twice that allows for normalization): tokenizing megabytes holds a replica."""
        if self.max_model_len is not None and text_chars > self.max_model_len * chars_per_token * 2:
            raise RequestError(f"messages: {text_chars:,} characters of text are more than serving.maxModelLen "
                               f"({self.max_model_len:,} tokens) can hold; send a shorter conversation")

    def check_length(self, prompt_tokens: int, max_tokens: int, default: bool) -> int:
        """The completion tokens a request may generate: `max_tokens`, or (when it is the run's default) what is
        left of `max_model_len`; a RequestError naming both numbers when they do not fit."""
        if self.max_model_len is None or prompt_tokens + max_tokens <= self.max_model_len:
            return max_tokens
        room = self.max_model_len - prompt_tokens
        if default and room >= 1:
            return room
        if room < 1:
            raise RequestError(f"messages: the prompt is {prompt_tokens:,} tokens, over serving.maxModelLen "
                               f"({self.max_model_len:,}) with no room to answer; send fewer or smaller images or a "
                               "shorter conversation")
        raise RequestError(f"max_tokens: the prompt is {prompt_tokens:,} tokens and max_tokens is {max_tokens:,}, "
                           f"{prompt_tokens + max_tokens:,} in all, over serving.maxModelLen ({self.max_model_len:,}); "
                           f"ask for at most {room:,} tokens, or send a shorter prompt")


DEFAULT_LIMITS = Limits.of(ServingBlock())  # the serving block's defaults state them once
UNBOUNDED = Limits(max_images=64, max_image_bytes=1 << 40, max_image_pixels=1 << 40)  # local use (vray.load)


def template_switches(kwargs: Any) -> dict[str, Any]:
    """A request's chat_template_kwargs, checked: only the known switches, each of its type."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs: an object is required (for example {\"enable_thinking\": false})")
    known = ", ".join(sorted(TEMPLATE_SWITCHES))
    for key, value in kwargs.items():
        kind = TEMPLATE_SWITCHES.get(key)
        if kind is None:
            raise RequestError(f"chat_template_kwargs.{key}: not accepted; a request may set only {known} (the "
                               "template and the system prompt are the deployment's; send a system message instead)")
        if not isinstance(value, kind):
            raise RequestError(f"chat_template_kwargs.{key}: got {value!r}; must be a {kind.__name__}")
    return dict(kwargs)

def _decode_base64(data: str, where: str, limits: Limits) -> bytes:
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(f"{where}: the image is over {limits.max_image_bytes // (1024 * 1024)} MiB; send a smaller "
                           "or more compressed image", status=413)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the image is neither a data: URL, an allowed http(s) URL, nor base64") from None


def _too_large(where: str, size: str, limits: Limits) -> RequestError:
    return RequestError(f"{where}: the image is {size}, over the limit of {limits.max_image_pixels:,} pixels; "
                        "downscale it first", status=413)


def _open_checked(raw: bytes, where: str, limits: Limits) -> Image.Image:
    """The RGB image of `raw`; its width x height is checked from the header, before any pixel is decoded."""
    try:
        # reads the header only, trying only the decoders of accepted formats (MPO files open through JPEG's)
        image = Image.open(io.BytesIO(raw), formats=sorted(IMAGE_FORMATS - {"MPO"}))
    except Image.DecompressionBombError:  # PIL's own guard, for headers far beyond any limit
        raise _too_large(where, f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels", limits) from None
    except Exception:  # noqa: BLE001 - any decoder failure is the caller's image
        raise RequestError(f"{where}: the image cannot be decoded (not a PNG, JPEG, WebP, GIF, BMP or TIFF)") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise _too_large(where, f"{w}x{h} pixels", limits)
    try:
        return image.convert("RGB")
    except Exception:  # noqa: BLE001
        raise RequestError(f"{where}: the image is truncated or corrupt") from None


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    """The bytes behind an allowed image URL, read up to the byte limit (redirects are not followed: they could
    leave the allowed hosts)."""
    import httpx

    mib = limits.max_image_bytes // (1024 * 1024)
    try:
        with httpx.stream("GET", url, timeout=URL_TIMEOUT_S, follow_redirects=False) as response:
            if response.status_code != 200:
                raise RequestError(f"{where}: fetching the image answered HTTP {response.status_code}; send the image "
                                   "as a data: URL, or a URL that answers 200 directly")
            raw = bytearray()
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) > limits.max_image_bytes:
                    raise RequestError(f"{where}: the image is over {mib} MiB; send a smaller or more compressed "
                                       "image", status=413)
    except httpx.HTTPError as exc:
        raise RequestError(f"{where}: the image could not be fetched ({type(exc).__name__}); send it as a data: "
                           "URL") from None
    return bytes(raw)


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
            raise RequestError(f"{where}: image URL host {host!r} is not allowed; send the image as a data: URL, "
                               "or allow the host (vray serve --allow-image-host, vray.load(allowed_image_hosts=...))")
        return _open_checked(_fetch(url, where, limits), where, limits)
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
