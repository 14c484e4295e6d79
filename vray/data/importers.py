"""Importers: the dataset formats users already have, converted to vray samples.

| format | what it reads |
|---|---|
| `coco` | COCO instances (detection) JSON: one phrase-grounding sample per image and category |
| `coco-captions` | COCO captions JSON: one freeform sample per caption |
| `llamafactory` | LLaMA-Factory multimodal data: sharegpt `conversations` (`from` / `value`) or `messages` (`role` / `content`), or alpaca (`instruction` / `input` / `output`), with `images` / `videos` lists and `<image>` / `<video>` tags |
| `ms-swift` | ms-swift `messages` + `images` + `objects {ref, bbox, bbox_type, image_id}`, with `<ref-object>` / `<bbox>` placeholders |
| `llava` | LLaVA `conversations` (`from` / `value`) with one `image` |
| `openai` | OpenAI chat `messages` whose user content has `text` and `image_url` parts |

Image paths in the source resolve relative to its folder (or `images_root`), as those projects do. Rows that
cannot be converted are skipped and counted by reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vray.data.io import base_of, write_samples
from vray.data.sample import IMAGE_TAG, Sample, is_remote, join_ref
from vray.errors import DataError
from vray.fs import filesystem

FORMATS = ("coco", "coco-captions", "llamafactory", "ms-swift", "llava", "openai")
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Converted:
    """The samples of a conversion and what was skipped, by reason."""

    samples: list[Sample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first row it happened at

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, where)


def _load_records(src: str) -> list[Any]:
    """A JSON document (array or object) or JSON Lines."""
    fs, path = filesystem(src)
    if not fs.exists(path):
        raise DataError(f"convert: {src!r} does not exist")
    with fs.open(path, "rt") as fh:
        text = fh.read()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        pass  # JSON Lines
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"convert: {src}:{lineno} is not valid JSON ({exc.msg})") from None
    return records


def _image_size(ref: str) -> tuple[int, int]:
    from vray.data.media import open_image

    with open_image(ref) as im:
        return im.size


def _sample(row: dict[str, Any], result: Converted, where: str) -> None:
    try:
        result.samples.append(Sample.model_validate(row))
    except Exception as exc:  # noqa: BLE001 - a row the schema refuses is skipped with its reason
        msg = str(exc).splitlines()
        reason = next((m.strip() for m in msg[1:] if m.strip() and not m.strip().startswith("For further")), msg[0])
        result.skip(reason.removeprefix("Value error, "), where)


# ---- COCO -------------------------------------------------------------------------------------------------


def convert_coco(src: str, root: str, task: str | None = None) -> Converted:
    """COCO instances: one grounding sample per (image, category), every instance a labelled box."""
    doc = _load_records(src)[0]
    result = Converted()
    cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
    images = {im["id"]: im for im in doc.get("images", [])}
    by_image: dict[Any, dict[str, list[list[float]]]] = {}
    for ann in doc.get("annotations", []):
        where = f"{src}: annotation {ann.get('id')}"
        if ann.get("iscrowd"):
            result.skip("crowd annotation (no single box)", where)
            continue
        if ann.get("image_id") not in images or ann.get("category_id") not in cats:
            result.skip("annotation of an unknown image or category", where)
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            result.skip("degenerate box (zero width or height)", where)
            continue
        by_image.setdefault(ann["image_id"], {}).setdefault(cats[ann["category_id"]], []).append([x, y, x + w, y + h])
    for image_id, per_cat in by_image.items():
        im = images[image_id]
        for name, boxes in sorted(per_cat.items()):
            prompt = f"Locate every {name} in the image." if len(boxes) > 1 else f"Locate the {name} in the image."
            _sample({
                "id": f"coco-{image_id}-{name.replace(' ', '_')}", "task": "phrase_grounding",
                "images": [join_ref(root, im["file_name"])],
                "conversation": [{"role": "user", "text": prompt},
                                 {"role": "assistant", "boxes": [{"label": name, "bbox": b, "image": 0} for b in boxes]}],
            }, result, f"{src}: image {image_id}")
    return result


def convert_coco_captions(src: str, root: str, task: str | None = None) -> Converted:
    """COCO captions: one freeform sample per caption."""
    doc = _load_records(src)[0]
    result = Converted()
    images = {im["id"]: im for im in doc.get("images", [])}
    for ann in doc.get("annotations", []):
        where = f"{src}: annotation {ann.get('id')}"
        im = images.get(ann.get("image_id"))
        caption = (ann.get("caption") or "").strip()
        if im is None:
            result.skip("caption of an unknown image", where)
            continue
        if not caption:
            result.skip("empty caption", where)
            continue
        _sample({"id": f"coco-caption-{ann.get('id', len(result.samples))}", "task": task or "freeform",
                 "images": [join_ref(root, im["file_name"])],
                 "conversation": [{"role": "user", "text": "Describe the image."}, {"role": "assistant", "text": caption}]},
                result, where)
    return result


# ---- chat formats -------------------------------------------------------------------------------------------


def _turns_from_messages(messages: list[dict[str, Any]], result: Converted, where: str) -> list[dict[str, Any]] | None:
    turns = []
    for m in messages:
        role = ROLE.get(m.get("role") or m.get("from") or "")
        if role is None:
            result.skip(f"unsupported role {m.get('role') or m.get('from')!r} (tool calls are not imported)", where)
            return None
        content = m.get("content", m.get("value", ""))
        if not isinstance(content, str):
            result.skip("message content is not text", where)
            return None
        turns.append({"role": role, "text": content})
    return turns


def _video_entries(videos: list[Any], root: str) -> list[Any]:
    out = []
    for v in videos:
        if isinstance(v, str):
            out.append({"path": join_ref(root, v)})
        elif isinstance(v, list):  # a frame list
            out.append({"frames": [join_ref(root, f) for f in v]})
    return out


def convert_llamafactory(src: str, root: str, task: str | None = None) -> Converted:
    """LLaMA-Factory multimodal data (sharegpt or alpaca layout)."""
    result = Converted()
    for i, rec in enumerate(_load_records(src)):
        where = f"{src}: record {i}"
        if "instruction" in rec:
            prompt = rec["instruction"] + (("\n" + rec["input"]) if rec.get("input") else "")
            turns = [{"role": "user", "text": prompt}, {"role": "assistant", "text": rec.get("output", "")}]
            if rec.get("system"):
                turns.insert(0, {"role": "system", "text": rec["system"]})
        else:
            turns = _turns_from_messages(rec.get("messages") or rec.get("conversations") or [], result, where)
            if turns is None:
                continue
            if rec.get("system"):
                turns.insert(0, {"role": "system", "text": rec["system"]})
        _sample({"id": str(rec.get("id", f"llamafactory-{i}")), "task": task or "freeform",
                 "images": [join_ref(root, p) for p in rec.get("images") or []],
                 "videos": _video_entries(rec.get("videos") or [], root), "conversation": turns}, result, where)
    return result


def _conversations(src: str, result: Converted, key: str) -> Iterator[tuple[int, dict[str, Any], str, list[dict[str, Any]]]]:
    """(index, record, where, turns) of every record whose `key` messages convert; the others are skipped with
    their reason in `result`."""
    for i, rec in enumerate(_load_records(src)):
        where = f"{src}: record {i}"
        turns = _turns_from_messages(rec.get(key) or [], result, where)
        if turns is not None:
            yield i, rec, where, turns


def convert_llava(src: str, root: str, task: str | None = None) -> Converted:
    """LLaVA instruction data: `image` plus `conversations` of human / gpt turns."""
    result = Converted()
    for i, rec, where, turns in _conversations(src, result, "conversations"):
        images = [rec["image"]] if isinstance(rec.get("image"), str) else list(rec.get("image") or [])
        for t in turns:  # LLaVA writes "<image>\n" at the start of the first question
            t["text"] = t["text"].replace(IMAGE_TAG + "\n", IMAGE_TAG).strip() if t["role"] == "user" else t["text"]
        _sample({"id": str(rec.get("id", f"llava-{i}")), "task": task or "freeform",
                 "images": [join_ref(root, p) for p in images], "conversation": turns}, result, where)
    return result


def convert_openai(src: str, root: str, task: str | None = None) -> Converted:
    """OpenAI chat fine-tuning data: `messages` with text and `image_url` parts."""
    result = Converted()
    for i, rec in enumerate(_load_records(src)):
        where = f"{src}: record {i}"
        images: list[str] = []
        turns = []
        ok = True
        for m in rec.get("messages") or []:
            role = ROLE.get(m.get("role", ""))
            if role is None:
                result.skip(f"unsupported role {m.get('role')!r} (tool calls are not imported)", where)
                ok = False
                break
            content = m.get("content") or ""
            if isinstance(content, str):
                turns.append({"role": role, "text": content})
                continue
            text = []
            for part in content:
                if part.get("type") == "text":
                    text.append(part.get("text", ""))
                elif part.get("type") == "image_url":
                    url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
                    images.append(url if (url.startswith("data:") or is_remote(url)) else join_ref(root, url))
                    text.append(IMAGE_TAG)
            turns.append({"role": role, "text": "".join(text)})
        if ok:
            _sample({"id": str(rec.get("id", f"openai-{i}")), "task": task or "freeform", "images": images,
                     "conversation": turns}, result, where)
    return result


def convert_ms_swift(src: str, root: str, task: str | None = None) -> Converted:
    """ms-swift grounding / multimodal data: `<ref-object>` and `<bbox>` placeholders filled from `objects`."""
    result = Converted()
    for i, rec, where, turns in _conversations(src, result, "messages"):
        images = [join_ref(root, p) for p in rec.get("images") or []]
        objects = rec.get("objects") or {}
        refs = list(objects.get("ref") or [])
        bboxes = list(objects.get("bbox") or [])
        image_ids = list(objects.get("image_id") or [0] * len(bboxes))
        norm = objects.get("bbox_type", "real") == "norm1000"
        try:
            sizes = {k: _image_size(images[k]) for k in set(image_ids)} if norm else {}
        except (DataError, IndexError) as exc:
            result.skip(f"norm1000 boxes need the image size: {exc}", where)
            continue
        ref_i = box_i = 0
        failed = False
        for t in turns:
            while "<ref-object>" in t["text"]:
                if ref_i >= len(refs):
                    failed = True
                    break
                t["text"] = t["text"].replace("<ref-object>", refs[ref_i], 1)
                ref_i += 1
            if "<bbox>" in t["text"]:
                boxes = []
                while "<bbox>" in t["text"] and box_i < len(bboxes):
                    x0, y0, x1, y1 = bboxes[box_i]
                    k = image_ids[box_i] if box_i < len(image_ids) else 0
                    if norm:
                        w, h = sizes[k]
                        x0, y0, x1, y1 = x0 * w / 1000, y0 * h / 1000, x1 * w / 1000, y1 * h / 1000
                    label = refs[box_i] if box_i < len(refs) else f"object {box_i}"
                    boxes.append({"label": label, "bbox": [x0, y0, x1, y1], "image": k})
                    t["text"] = t["text"].replace("<bbox>", "", 1)
                    box_i += 1
                if "<bbox>" in t["text"]:
                    failed = True
                t["boxes"] = boxes
                t["text"] = t["text"].strip()
        if failed:
            result.skip("more <ref-object> / <bbox> placeholders than objects", where)
            continue
        has_boxes = any(t.get("boxes") for t in turns)
        _sample({"id": str(rec.get("id", f"ms-swift-{i}")), "task": "phrase_grounding" if has_boxes else (task or "freeform"),
                 "images": images, "conversation": turns}, result, where)
    return result


CONVERTERS = {
    "coco": convert_coco, "coco-captions": convert_coco_captions, "llamafactory": convert_llamafactory,
    "ms-swift": convert_ms_swift, "llava": convert_llava, "openai": convert_openai,
}


def _media_refs(sample: Sample) -> Iterator[str]:
    yield from sample.images
    for v in sample.videos:
        if v.path:
            yield v.path
        yield from v.frames or ()


def copy_media(samples: list[Sample], dest: str) -> list[Sample]:
    """Copy every referenced image / video file into DEST/media/ and point the samples at the copies."""
    fs_dest, dest_path = filesystem(dest)
    target_dir = f"{dest.rstrip('/')}/media"
    fs_dest.makedirs(f"{dest_path.rstrip('/')}/media", exist_ok=True)
    mapping: dict[str, str] = {}
    for sample in samples:
        for ref in _media_refs(sample):
            if ref in mapping or ref.startswith("data:"):
                continue
            name = f"{len(mapping):06d}-{Path(ref.split('?')[0]).name}"
            target = f"{target_dir}/{name}"
            fs_src, src_path = filesystem(ref)
            if not fs_src.exists(src_path):
                raise DataError(f"convert --copy-images: {ref} does not exist")
            if not is_remote(ref) and not is_remote(dest):
                shutil.copyfile(src_path, target)
            else:
                with fs_src.open(src_path, "rb") as r, fs_dest.open(filesystem(target)[1], "wb") as w:
                    w.write(r.read())
            mapping[ref] = target
    out = []
    for s in samples:
        videos = tuple(v.model_copy(update={"path": mapping.get(v.path, v.path) if v.path else None,
                                            "frames": tuple(mapping.get(f, f) for f in v.frames) if v.frames else None})
                       for v in s.videos)
        out.append(s.model_copy(update={"images": tuple(mapping.get(i, i) for i in s.images), "videos": videos}))
    return out


def convert(src: str, fmt: str, dest: str, parquet: bool = False, copy_images: bool = False,
            task: str | None = None, images_root: str | None = None) -> tuple[str, Converted]:
    """Convert SRC (in FORMAT) to DEST/data.jsonl (or .parquet); returns (written file, conversion)."""
    if fmt not in CONVERTERS:
        from vray.archs.registry import suggest

        raise DataError(f"--from {fmt!r} is not a format{suggest(fmt, list(FORMATS))}; choose one of {', '.join(FORMATS)}")
    root = images_root or base_of(src)
    result = CONVERTERS[fmt](src, root, task)
    if not result.samples:
        reasons = "; ".join(f"{n} x {r}" for r, n in result.skipped.items()) or "no records"
        raise DataError(f"convert: {src} gave no samples as {fmt} ({reasons})")
    samples = copy_media(result.samples, dest) if copy_images else result.samples
    written = write_samples(samples, dest, parquet=parquet)
    return written, result
