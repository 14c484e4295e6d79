"""Abusive requests for a vray endpoint on 127.0.0.1, each with the status the server must answer: the load test
of the Serve app and `benchmarks/serve_abuse.py` send the same mix."""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
from PIL import Image

CHAT = "/v1/chat/completions"


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (112, 112)) -> str:
    """A data: URL of a one-colour PNG."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_claiming(width: int, height: int) -> str:
    """A data: URL of a PNG whose header says width x height, followed by a few bytes of pixel data: decoding it
    fails (a real image of that size would take gigabytes), so only a check of the header refuses it cleanly."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def messages(text: str = "What colour is the square?", image: str | None = None) -> list[dict]:
    """One user turn: an image and a question."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image or png()}},
                                         {"type": "text", "text": text}]}]


def chunked_over_the_limit(url: str, limit: int, headers: dict[str, str]) -> int:
    """POST a chunked body past `limit` bytes and then hold it open, never sending its last chunk: the answer can
    only come while the body is still being read. The status, 0 when none came in 60 s."""
    where = urlsplit(url)
    lines = [f"POST {CHAT} HTTP/1.1", f"Host: {where.netloc}", "Content-Type: application/json",
             "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((where.hostname, where.port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        piece = b"x" * (64 * 1024)
        try:
            for _ in range(limit // len(piece) + 4):
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            head = sock.recv(4096).decode(errors="replace")
        except (TimeoutError, ConnectionError):
            return 0
    return int(head.split()[1]) if head.startswith("HTTP/") else 0


def stream_then_disconnect(url: str, headers: dict[str, str]) -> int:
    """A streaming request whose client reads the first event and goes away; the status it saw."""
    body = {"messages": messages(), "max_tokens": 32, "stream": True}
    with httpx.stream("POST", url + CHAT, json=body, headers=headers, timeout=120) as r:
        next(r.iter_lines())
        return r.status_code


def abusive_requests(url: str, headers: dict[str, str], base_id: str, max_body_bytes: int,
                     max_model_len: int) -> dict[str, tuple[Callable[[int], int], int]]:
    """Each abusive kind: a call (taking a request number, returning the HTTP status) and the status it must get.
    `base_id`: the deployment's base, whose `<base>:<adapter>` names a client may invent."""

    def post(body: dict, extra: dict[str, str] | None = None) -> int:
        return httpx.post(url + CHAT, json=body, headers={**headers, **(extra or {})}, timeout=120).status_code

    return {
        "prompt over maxModelLen": (lambda i: post({"messages": messages(text="colour? " * max_model_len)}), 400),
        "a megabyte of text": (lambda i: post({"messages": messages(text="colour? " * 128 * 1024)}), 400),
        "max_tokens over maxModelLen": (lambda i: post({"messages": messages(), "max_tokens": 10**9}), 400),
        "image header of 900 MP": (lambda i: post({"messages": messages(image=png_claiming(30000, 30000))}), 413),
        "template replaced": (lambda i: post({"messages": messages(), "chat_template_kwargs": {
            "chat_template": "{{ 'x' * 10**9 }}"}}), 400),
        "invented adapter": (lambda i: post({"model": f"{base_id}:made-up-{i}", "messages": messages()}), 404),
        "wrong key": (lambda i: post({"messages": messages()}, {"Authorization": "Bearer wrong-key"}), 401),
        "chunked body over maxBodyMB": (lambda i: chunked_over_the_limit(url, max_body_bytes, headers), 413),
        "stream then disconnect": (lambda i: stream_then_disconnect(url, headers), 200),
    }
