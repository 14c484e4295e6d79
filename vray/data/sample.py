"""The vray sample (one JSON object a line, or one Parquet row).

```
{"id": "...", "task": "phrase_grounding|vqa|freeform",
 "images": ["path" | "s3://..." | "data:image/png;base64,..." | {"bytes": "<base64>"} | {"path": "..."}],
 "videos": ["clip.mp4" | {"path": "clip.mp4", "fps": 2} | {"frames": ["f0.jpg", "f1.jpg"], "fps": 2}],
 "conversation": [{"role": "system|user|assistant", "text": "...",
                   "boxes": [{"label": "...", "bbox": [x0, y0, x1, y1], "image": 0}]}]}
```

Boxes are absolute pixels of the original image. Images and videos go where a user turn writes `<image>` /
`<video>`; without any tag they open the first user turn. Every assistant turn is learned; an answer may
carry a reasoning trace (`<think>...</think>`), which is kept and learned too. Relative paths resolve
against the dataset file's folder (local or s3://).
"""

from __future__ import annotations

import base64
import posixpath
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vray.errors import DataError

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
THINK = re.compile(r"<think>.*?</think>", re.S)


class Box(BaseModel):
    """A labelled box in absolute pixels of the original image `image` of the sample."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    bbox: tuple[float, float, float, float]
    image: int = Field(0, ge=0)

    @field_validator("bbox")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = v
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"bbox {list(v)} is degenerate: not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        if min(v) < 0:
            raise ValueError(f"bbox {list(v)} has a negative coordinate (absolute pixels start at 0)")
        return v


class Turn(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    text: str = ""
    boxes: tuple[Box, ...] = ()

    @property
    def has_reasoning(self) -> bool:
        """Whether the text carries a `<think>...</think>` trace."""
        return bool(THINK.search(self.text))


class Video(BaseModel):
    """A video: a file (decoded with PyAV) or a list of frame images, with its frame rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str | None = None
    frames: tuple[str, ...] | None = None
    fps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> Video:
        if (self.path is None) == (self.frames is None):
            raise ValueError("a video is either a file ('path') or a list of frame images ('frames'), not both or neither")
        if self.frames is not None and not self.frames:
            raise ValueError("a video's frame list is empty")
        return self


class Sample(BaseModel):
    """One training or evaluation example."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    task: Literal["phrase_grounding", "vqa", "freeform"]
    images: tuple[str, ...] = ()
    videos: tuple[Video, ...] = ()
    conversation: tuple[Turn, ...]

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @field_validator("images", mode="before")
    @classmethod
    def _image_refs(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return v
        return tuple(_image_ref(item) for item in v)

    @field_validator("videos", mode="before")
    @classmethod
    def _video_refs(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return v
        return tuple({"path": item} if isinstance(item, str) else item for item in v)

    @model_validator(mode="after")
    def _shape(self) -> Sample:
        roles = [t.role for t in self.conversation]
        if "user" not in roles:
            raise ValueError("conversation has no user turn")
        if roles[-1] != "assistant":
            raise ValueError("conversation must end with an assistant turn (the answer to learn and to score)")
        for turn in self.conversation:
            if turn.role == "assistant" and not turn.text.strip() and not turn.boxes:
                raise ValueError("an assistant turn has an empty answer (no text and no boxes)")
            if turn.role != "assistant" and turn.boxes:
                raise ValueError(f"boxes belong to assistant turns, not to a {turn.role} turn")
            for box in turn.boxes:
                if box.image >= len(self.images):
                    raise ValueError(f"box '{box.label}' refers to image {box.image} but the sample has {len(self.images)} image(s)")
        for tag, count, what in ((IMAGE_TAG, len(self.images), "images"), (VIDEO_TAG, len(self.videos), "videos")):
            tags = sum(t.text.count(tag) for t in self.conversation if t.role == "user")
            if tags and tags != count:
                raise ValueError(f"{tags} {tag} tag(s) in the user turns but {count} {what}")
            if any(tag in t.text for t in self.conversation if t.role != "user"):
                raise ValueError(f"{tag} tags belong in user turns")
        if self.task == "phrase_grounding" and not any(t.boxes for t in self.conversation if t.role == "assistant"):
            raise ValueError("a phrase_grounding sample needs boxes on its assistant turn")
        return self

    @property
    def answer(self) -> Turn:
        """The last assistant turn (the one evaluation scores)."""
        return self.conversation[-1]

    @property
    def system(self) -> str | None:
        """The sample's own system prompt, if it has one."""
        return next((t.text for t in self.conversation if t.role == "system"), None)

    @property
    def has_reasoning(self) -> bool:
        """Whether any answer carries a reasoning trace."""
        return any(t.has_reasoning for t in self.conversation if t.role == "assistant")

    def resolved(self, base: str) -> Sample:
        """The sample with relative image, video and frame paths joined to `base` (a folder or s3:// prefix)."""
        videos = tuple(v.model_copy(update={"path": join_ref(base, v.path) if v.path else None,
                                            "frames": tuple(join_ref(base, f) for f in v.frames) if v.frames else None})
                       for v in self.videos)
        return self.model_copy(update={"images": tuple(join_ref(base, i) for i in self.images), "videos": videos})


def final_answer(text: str) -> str:
    """An answer without its reasoning trace (what metrics compare)."""
    return THINK.sub("", text).strip()


def _image_ref(item: Any) -> Any:
    """An image entry as one string: a path or URI, or a data: URL for embedded bytes."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            raw = item["bytes"]
            data = base64.b64encode(raw).decode() if isinstance(raw, (bytes, bytearray)) else str(raw)
            return f"data:image;base64,{data}"
        if item.get("path"):
            return str(item["path"])
    if isinstance(item, (bytes, bytearray)):
        return "data:image;base64," + base64.b64encode(item).decode()
    return item


def is_remote(ref: str) -> bool:
    """Whether a reference is a URI (s3://, http(s)://, ...) rather than a local path."""
    return "://" in ref


def join_ref(base: str, ref: str) -> str:
    """`ref` resolved against a dataset folder (local path or URI); absolute paths, URIs and data: stay."""
    if ref.startswith("data:") or is_remote(ref) or Path(ref).is_absolute():
        return ref
    if is_remote(base):
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, ref))}"
    return str((Path(base) / ref).resolve())


def parse_row(row: Any, where: str) -> Sample:
    """A Sample from one row; a DataError naming `where` (file:line) and every problem."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    try:
        return Sample.model_validate(row)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'row'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise DataError(f"{where}: {detail}") from None
