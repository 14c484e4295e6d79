"""Synthetic datasets in vray's sample format that a tiny model learns in minutes on a CPU.

Coloured shapes on a plain background: "What colour is the square?" -> "red" (vqa), "Locate the red
circle." -> its box (phrase_grounding), "Describe the image." -> "a red circle" (freeform). Each dataset is
written once to a cache folder with `train.jsonl`, `eval.jsonl` (the held-out split) and `images/`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from PIL import Image, ImageDraw

from vray.errors import VrayError
from vray.models.cache import cache_root
from vray.models.tiny_tokenizer import COLOURS, SHAPES
from vray.spec import SYNTHETIC_TASKS

IMAGE_SIZE = 112
FORMAT_VERSION = 3


@dataclass(frozen=True)
class SyntheticSpec:
    """What `synthetic:<task>?train=N&eval=M&seed=S&size=PX` asks for."""

    task: str
    train: int = 256
    eval: int = 64
    seed: int = 0
    size: int = IMAGE_SIZE

    @property
    def folder_name(self) -> str:
        """Cache folder of this dataset."""
        return f"{self.task}-t{self.train}-e{self.eval}-s{self.seed}-px{self.size}-v{FORMAT_VERSION}"


def parse_uri(uri: str) -> SyntheticSpec:
    """The dataset a `synthetic:` URI names; a VrayError for an unknown task or option."""
    body = uri.split(":", 1)[1] if ":" in uri else uri
    name, _, query = body.partition("?")
    if name not in SYNTHETIC_TASKS:
        raise VrayError(f"data: '{uri}' names no synthetic dataset; use synthetic:vqa, synthetic:grounding or synthetic:freeform")
    opts: dict[str, int] = {}
    for key, value in parse_qsl(query):
        if key not in ("train", "eval", "seed", "size"):
            raise VrayError(f"data: '{uri}': unknown option '{key}'; options are train, eval, seed, size")
        try:
            opts[key] = int(value)
        except ValueError:
            raise VrayError(f"data: '{uri}': option {key}={value!r} is not an integer") from None
    return SyntheticSpec(task=SYNTHETIC_TASKS[name], **opts)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _random_box(rng: random.Random, size: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    for _ in range(100):
        side = rng.randint(size // 4, size // 2)
        x0, y0 = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] <= t[0] or box[0] >= t[2] or box[3] <= t[1] or box[1] >= t[3] for t in taken):
            return box
    return box


def _sample(rng: random.Random, task: str, index: int, split: str, image_rel: str, size: int, path: Path) -> dict:
    background = tuple(rng.randint(235, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    n_objects = 1 if task == "vqa" else rng.choice((1, 2))
    objects = []
    taken: list[tuple[int, int, int, int]] = []
    used: set[tuple[str, str]] = set()
    while len(objects) < n_objects:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) in used or any(s == shape for _, s in used):
            continue
        box = _random_box(rng, size, taken)
        taken.append(box)
        used.add((colour, shape))
        _draw(draw, shape, box, COLOURS[colour])
        objects.append((colour, shape, box))
    image.save(path)

    colour, shape, box = objects[0]
    if task == "vqa":
        # Colour is what a tiny model with a random, frozen vision tower can learn to read in minutes.
        question, answer = f"What colour is the {shape}?", colour
        assistant = {"role": "assistant", "text": answer}
    elif task == "phrase_grounding":
        question = f"Locate the {colour} {shape}."
        assistant = {"role": "assistant", "text": "", "boxes": [{"label": f"{colour} {shape}", "bbox": list(box), "image": 0}]}
    else:
        question = "Describe the image."
        described = " and ".join(f"a {c} {s}" for c, s, _ in objects)
        assistant = {"role": "assistant", "text": described[0].upper() + described[1:] + "."}
    return {
        "id": f"{split}-{index:05d}",
        "task": task,
        "images": [image_rel],
        "conversation": [{"role": "user", "text": question}, assistant],
    }


def materialize(uri: str, root: Path | None = None) -> Path:
    """Write the dataset a `synthetic:` URI names (once) and return its folder."""
    spec = parse_uri(uri)
    base = (root or cache_root()) / "synthetic"
    folder = base / spec.folder_name
    if (folder / "eval.jsonl").exists():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder_name}-", dir=base))
    (tmp / "images").mkdir()
    rng = random.Random(spec.seed)
    for split, count in (("train", spec.train), ("eval", spec.eval)):
        with open(tmp / f"{split}.jsonl", "w") as out:
            for i in range(count):
                rel = f"images/{split}-{i:05d}.png"
                out.write(json.dumps(_sample(rng, spec.task, i, split, rel, spec.size, tmp / rel)) + "\n")
    try:
        tmp.rename(folder)  # atomic: a concurrent writer that lost the race leaves the winner's copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def split_paths(uri: str) -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of a synthetic dataset, written on first use."""
    folder = materialize(uri)
    return folder / "train.jsonl", folder / "eval.jsonl"
