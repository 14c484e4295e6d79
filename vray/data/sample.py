"""The vray sample (one JSON object a line) and a row-checked JSONL reader.

`{"id", "task", "images": [path or s3 URI], "conversation": [{"role": "system|user|assistant",
"text": "...", "boxes": [{"label", "bbox": [x0, y0, x1, y1], "image": 0}]}]}`; boxes are absolute pixels
of the original image. Relative image paths resolve against the dataset file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vray.errors import DataError


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
            raise ValueError(f"bbox {list(v)} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        if min(v) < 0:
            raise ValueError(f"bbox {list(v)} has a negative coordinate (absolute pixels start at 0)")
        return v


class Turn(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    text: str = ""
    boxes: tuple[Box, ...] = ()


class Sample(BaseModel):
    """One training or evaluation example."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    task: Literal["phrase_grounding", "vqa", "freeform"]
    images: tuple[str, ...] = ()
    conversation: tuple[Turn, ...]

    @model_validator(mode="after")
    def _shape(self) -> Sample:
        roles = [t.role for t in self.conversation]
        if "user" not in roles:
            raise ValueError("conversation has no user turn")
        if roles[-1] != "assistant":
            raise ValueError("conversation must end with the assistant turn to learn (and to score)")
        for turn in self.conversation:
            for box in turn.boxes:
                if box.image >= len(self.images):
                    raise ValueError(f"box '{box.label}' refers to image {box.image} but the sample has {len(self.images)} image(s)")
        if self.task == "phrase_grounding" and not self.conversation[-1].boxes:
            raise ValueError("a phrase_grounding sample needs boxes on its assistant turn")
        return self

    @property
    def answer(self) -> Turn:
        """The assistant turn the model learns and is scored on."""
        return self.conversation[-1]

    @property
    def system(self) -> str | None:
        """The sample's own system prompt, if it has one."""
        return next((t.text for t in self.conversation if t.role == "system"), None)


def _resolve(image: str, base: Path) -> str:
    if "://" in image or image.startswith("data:") or Path(image).is_absolute():
        return image
    return str((base / image).resolve())


def read_jsonl(path: str | Path, task: str | None = None) -> list[Sample]:
    """Every sample of a vray JSONL file; one DataError naming each bad line (up to 20) and the fix."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data: {str(p)!r} does not exist")
    samples: list[Sample] = []
    problems: list[str] = []
    with open(p) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                sample = Sample.model_validate(row)
            except json.JSONDecodeError as exc:
                problems.append(f"{p}:{lineno}: not valid JSON ({exc.msg})")
                continue
            except ValidationError as exc:
                detail = "; ".join(
                    f"{'.'.join(str(x) for x in e['loc']) or 'row'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
                )
                problems.append(f"{p}:{lineno}: {detail}")
                continue
            if task is not None and sample.task != task:
                problems.append(f"{p}:{lineno}: sample '{sample.id}' is a {sample.task} sample but the run's task is {task}")
                continue
            samples.append(sample.model_copy(update={"images": tuple(_resolve(i, p.parent) for i in sample.images)}))
    if problems:
        shown = "\n".join(f"  - {m}" for m in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{len(problems)} bad row(s) in {p} (nothing was trained; fix them or remove them):\n{shown}{more}"
        )
    if not samples:
        raise DataError(f"data: {p} holds no samples")
    return samples
