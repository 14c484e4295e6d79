"""Opening images and videos from paths, s3:// or http(s) URIs and data: URLs, with one clear error each."""

from __future__ import annotations

import base64
import io
import tempfile
from typing import Any

from PIL import Image

from vray.data.sample import Video, is_remote
from vray.errors import DataError
from vray.fs import filesystem

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
DEFAULT_VIDEO_FPS = 2.0


def _shown(ref: str) -> str:
    return ref if len(ref) < 120 else ref[:60] + "..."


def read_bytes(ref: str) -> bytes:
    """The raw bytes behind a reference."""
    if ref.startswith("data:"):
        return base64.b64decode(ref.split(",", 1)[1])
    fs, path = filesystem(ref)
    with fs.open(path, "rb") as fh:
        return fh.read()


def open_image(ref: str) -> Image.Image:
    """A lazily decoded PIL image (header read; pixels on first use); a DataError when it cannot be opened."""
    try:
        raw = read_bytes(ref) if (ref.startswith("data:") or is_remote(ref)) else None
        image = Image.open(io.BytesIO(raw)) if raw is not None else Image.open(ref)
    except FileNotFoundError:
        raise DataError(f"image {_shown(ref)!r} is missing", kind="missing image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is one message
        raise DataError(f"image {_shown(ref)!r} cannot be read ({_reason(exc)})", kind="unreadable image") from None
    if image.format not in IMAGE_FORMATS:
        raise DataError(f"image {_shown(ref)!r} is {image.format or 'an unknown format'}; use one of "
                        f"{', '.join(sorted(IMAGE_FORMATS))}", kind="unsupported format")
    return image


def load_image(ref: str) -> Image.Image:
    """An RGB image, fully decoded (a truncated or corrupt file fails here, naming the file)."""
    image = open_image(ref)
    try:
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"image {_shown(ref)!r} is corrupt ({_reason(exc)})", kind="unreadable image") from None


def _reason(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a decodable image"
    return f"{type(exc).__name__}: {exc}"


def load_video(video: Video, max_frames: int | None = None) -> tuple[list[Image.Image], float]:
    """(frames, fps) of a video: its frame images, or frames sampled from the file (PyAV), at most `max_frames`."""
    if video.frames is not None:
        refs = list(video.frames)
        fps = video.fps or DEFAULT_VIDEO_FPS
        if max_frames and len(refs) > max_frames:
            step = len(refs) / max_frames
            refs = [refs[int(i * step)] for i in range(max_frames)]
            fps = fps / step
        return [load_image(r) for r in refs], fps
    assert video.path is not None
    try:
        from transformers.video_utils import load_video as hf_load_video
    except ImportError:  # pragma: no cover - transformers always has it
        raise DataError("decoding video files needs transformers' video utilities") from None
    path = video.path
    tmp = None
    try:
        if is_remote(path):
            tmp = tempfile.NamedTemporaryFile(suffix="." + path.rsplit(".", 1)[-1])
            tmp.write(read_bytes(path))
            tmp.flush()
            path = tmp.name
        kwargs: dict[str, Any] = {"backend": "pyav"}
        if video.fps:
            kwargs["fps"] = video.fps
        elif max_frames:
            kwargs["num_frames"] = max_frames
        frames, meta = hf_load_video(path, **kwargs)
    except ImportError:
        raise DataError(f"video {_shown(video.path)!r}: decoding video files needs PyAV (`pip install av`)") from None
    except FileNotFoundError:
        raise DataError(f"video {_shown(video.path)!r} is missing") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"video {_shown(video.path)!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
    finally:
        if tmp is not None:
            tmp.close()
    images = [Image.fromarray(f) for f in frames]
    if max_frames and len(images) > max_frames:
        step = len(images) / max_frames
        images = [images[int(i * step)] for i in range(max_frames)]
    fps = float(getattr(meta, "sampled_fps", None) or video.fps or DEFAULT_VIDEO_FPS)
    return images, fps
