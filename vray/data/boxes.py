"""Box conventions: absolute xyxy on the original image inside vray, each family's own form in its answers.

- qwen2.5vl-abs-resized (Qwen2.5-VL, Cosmos-Reason1): absolute pixels of the image after the processor's
  resize, as `[{"bbox_2d": [x0, y0, x1, y1], "label": "..."}]`;
- qwen3-rel1000 (Qwen3-VL, Qwen3.5, Cosmos-Reason2): integers on a 0-1000 grid, same JSON form;
- internvl-rel1000 (InternVL3.5): `<ref>label</ref><box>[[x0, y0, x1, y1]]</box>` on a 0-1000 grid;
- nvila-rel1 (NVILA-Lite): fractions of width and height with three decimals, as `[{"bbox": [...], "label"}]`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vray.archs.registry import BOX_INTERNVL_REL1000, BOX_NVILA_REL1, BOX_QWEN3_REL1000, BOX_QWEN25_ABS

CONVENTIONS = (BOX_QWEN25_ABS, BOX_QWEN3_REL1000, BOX_INTERNVL_REL1000, BOX_NVILA_REL1)


@dataclass(frozen=True)
class ImageGeometry:
    """An image's original size and the size the processor resizes it to (both width, height)."""

    width: int
    height: int
    resized_width: int
    resized_height: int

    @classmethod
    def unresized(cls, width: int, height: int) -> ImageGeometry:
        """Geometry of an image the processor does not resize."""
        return cls(width, height, width, height)


@dataclass(frozen=True)
class PixelBox:
    """A labelled box in absolute pixels of the original image."""

    label: str
    bbox: tuple[float, float, float, float]


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def to_model(bbox: tuple[float, ...], convention: str, geo: ImageGeometry) -> list[int | float]:
    """Original-image pixels -> the numbers the model writes."""
    x0, y0, x1, y1 = bbox
    if convention == BOX_QWEN25_ABS:
        sx, sy = geo.resized_width / geo.width, geo.resized_height / geo.height
        return [round(_clip(x0 * sx, geo.resized_width)), round(_clip(y0 * sy, geo.resized_height)),
                round(_clip(x1 * sx, geo.resized_width)), round(_clip(y1 * sy, geo.resized_height))]
    if convention in (BOX_QWEN3_REL1000, BOX_INTERNVL_REL1000):
        return [round(_clip(x0 / geo.width * 1000, 1000)), round(_clip(y0 / geo.height * 1000, 1000)),
                round(_clip(x1 / geo.width * 1000, 1000)), round(_clip(y1 / geo.height * 1000, 1000))]
    if convention == BOX_NVILA_REL1:
        return [round(_clip(x0 / geo.width, 1), 3), round(_clip(y0 / geo.height, 1), 3),
                round(_clip(x1 / geo.width, 1), 3), round(_clip(y1 / geo.height, 1), 3)]
    raise ValueError(f"unknown box convention {convention!r}; known: {', '.join(CONVENTIONS)}")


def from_model(coords: list[float], convention: str, geo: ImageGeometry) -> tuple[float, float, float, float]:
    """The numbers the model wrote -> original-image pixels (clipped to the image)."""
    x0, y0, x1, y1 = (float(c) for c in coords)
    if convention == BOX_QWEN25_ABS:
        sx, sy = geo.width / geo.resized_width, geo.height / geo.resized_height
        out = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    elif convention in (BOX_QWEN3_REL1000, BOX_INTERNVL_REL1000):
        out = (x0 / 1000 * geo.width, y0 / 1000 * geo.height, x1 / 1000 * geo.width, y1 / 1000 * geo.height)
    elif convention == BOX_NVILA_REL1:
        out = (x0 * geo.width, y0 * geo.height, x1 * geo.width, y1 * geo.height)
    else:
        raise ValueError(f"unknown box convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    return (_clip(out[0], geo.width), _clip(out[1], geo.height), _clip(out[2], geo.width), _clip(out[3], geo.height))


def format_answer(boxes: list[PixelBox], convention: str, geo: ImageGeometry) -> str:
    """The grounding answer text a family is trained to write for these boxes."""
    if convention == BOX_INTERNVL_REL1000:
        by_label: dict[str, list[list[int | float]]] = {}
        for b in boxes:
            by_label.setdefault(b.label, []).append(to_model(b.bbox, convention, geo))
        return "".join(
            f"<ref>{label}</ref><box>[{', '.join('[' + ', '.join(str(c) for c in q) + ']' for q in qs)}]</box>"
            for label, qs in by_label.items()
        )
    key = "bbox" if convention == BOX_NVILA_REL1 else "bbox_2d"
    return json.dumps([{key: to_model(b.bbox, convention, geo), "label": b.label} for b in boxes])


_INTERNVL = re.compile(r"<ref>(.*?)</ref>\s*<box>\s*(\[.*?\]\])\s*</box>", re.S)
_JSON_LIST = re.compile(r"\[\s*\{.*\}\s*\]", re.S)


def parse_answer(text: str, convention: str, geo: ImageGeometry) -> list[PixelBox]:
    """Boxes (original-image pixels) in a model's answer; malformed parts are skipped, never raised."""
    found: list[PixelBox] = []
    if convention == BOX_INTERNVL_REL1000:
        for label, quads in _INTERNVL.findall(text):
            try:
                for q in json.loads(quads):
                    if len(q) == 4:
                        found.append(PixelBox(label.strip(), from_model(q, convention, geo)))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
        return found
    match = _JSON_LIST.search(text)
    if not match:
        return found
    try:
        items: Any = json.loads(match.group(0))
    except json.JSONDecodeError:
        return found
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        coords = item.get("bbox_2d", item.get("bbox"))
        if isinstance(coords, list) and len(coords) == 4 and all(isinstance(c, (int, float)) for c in coords):
            found.append(PixelBox(str(item.get("label", "")).strip(), from_model(coords, convention, geo)))
    return found


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
