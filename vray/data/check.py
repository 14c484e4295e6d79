"""Dataset validation: every problem of every row, with its row, before any training starts.

Errors: invalid JSON or schema (empty answer, degenerate box, tags that do not match the media), duplicate
id, missing / unreadable / corrupt image or video, unsupported format, box outside its image, sample over
the token budget. Warnings: a sample above 90% of the budget, a conversation whose earlier answers the chat
template rewrites (only the last one is then learned).
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from vray.archs.registry import Architecture
from vray.data.io import ReadResult, read_samples
from vray.data.sample import Sample
from vray.errors import DataError, VrayError

BOX_TOLERANCE = 0.5  # pixels a box may overhang its image (rounding in exporters)


@dataclass(frozen=True)
class Issue:
    """One problem of one row."""

    where: str
    severity: str  # "error" | "warning"
    kind: str
    message: str
    sample_id: str | None = None


@dataclass
class Report:
    """What `vray data check` found."""

    source: str
    rows: int = 0
    issues: list[Issue] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    budget: int | None = None
    token_counts: str = "processor"  # "processor" (exact) or "estimated"

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def invalid_ids(self) -> set[str]:
        """Ids of samples with an error (rows that do not parse have none and are skipped anyway)."""
        return {i.sample_id for i in self.errors if i.sample_id is not None}

    @property
    def invalid_rows(self) -> int:
        return len({i.where for i in self.errors})

    def counts(self) -> dict[str, int]:
        return dict(Counter(f"{i.severity}: {i.kind}" for i in self.issues))

    def summary(self) -> dict[str, Any]:
        """Counts and token statistics (what `--json` prints, without the rows)."""
        toks = sorted(self.tokens)
        return {
            "source": self.source, "rows": self.rows, "valid_rows": self.rows - self.invalid_rows,
            "errors": len(self.errors), "warnings": len(self.warnings), "by_kind": self.counts(),
            "tokens": {"max": toks[-1], "median": toks[len(toks) // 2], "budget": self.budget,
                       "counted_with": self.token_counts} if toks else None,
        }

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "issues": [asdict(i) for i in self.issues]}, indent=2)


def _estimate_tokens(sample: Sample, arch: Architecture, sizes: list[tuple[int, int]]) -> int:
    """Visual tokens from the family's resize rule and ~3.5 characters a text token (no processor at hand)."""
    from vray.archs.vision import visual_tokens

    visual = sum(visual_tokens(arch, w, h) for w, h in sizes)
    text = sum(len(t.text) for t in sample.conversation)
    return visual + int(text / 3.5) + 8 * len(sample.conversation)


def _check_sample(sample: Sample, where: str, arch: Architecture, collator: Any, budget: int | None,
                  max_frames: int | None) -> tuple[list[Issue], int | None]:
    from vray.data.collate import Media
    from vray.data.media import load_image, load_video

    issues: list[Issue] = []

    def err(kind: str, msg: str) -> None:
        issues.append(Issue(where, "error", kind, msg, sample.id))

    images = []
    for k, ref in enumerate(sample.images):
        try:
            images.append(load_image(ref))
        except DataError as exc:
            err(exc.kind or "unreadable image", f"image {k}: {exc}")
            images.append(None)
    videos = []
    for k, video in enumerate(sample.videos):
        try:
            videos.append(load_video(video, max_frames))
        except DataError as exc:
            err("unreadable video", f"video {k}: {exc}")
            videos.append(None)
    for turn in sample.conversation:
        for box in turn.boxes:
            im = images[box.image] if box.image < len(images) else None
            if im is None:
                continue
            x0, y0, x1, y1 = box.bbox
            if x1 > im.width + BOX_TOLERANCE or y1 > im.height + BOX_TOLERANCE:
                err("box outside the image", f"box '{box.label}' {list(box.bbox)} is outside image {box.image} "
                                             f"({im.width}x{im.height}); boxes are absolute pixels of the original image")
    if any(i is None for i in images) or any(v is None for v in videos):
        return issues, None
    if collator is not None:
        try:
            encoded = collator.encode(sample, media=Media(images, videos))
            tokens = encoded.length
            for note in encoded.notes:
                issues.append(Issue(where, "warning", "history not learned", note, sample.id))
        except DataError as exc:
            err(exc.kind if exc.kind == "over token budget" else "cannot be encoded", str(exc))
            return issues, None
    else:
        tokens = _estimate_tokens(sample, arch, [(im.width, im.height) for im in images])
        if budget and tokens > budget:
            err("over token budget", f"about {tokens} tokens, over the budget of {budget}")
    if budget and tokens <= budget and tokens > 0.9 * budget:
        issues.append(Issue(where, "warning", "near token budget", f"{tokens} tokens of a {budget} budget", sample.id))
    return issues, tokens


def counting_processor(source: str, revision: str | None = None, media: Any = None) -> tuple[Any, str | None]:
    """(the processor that counts a sample's tokens exactly, None) or, when the model is out of reach (an offline
    hub), (None, why): token counts are then estimated."""
    from vray.models.loader import load_processor, resolve_processor_source

    try:
        return load_processor(resolve_processor_source(source, revision), media), None
    except VrayError as exc:
        return None, str(exc)


def check_dataset(uri: str, arch: Architecture, processor: Any = None, task: str | None = None,
                  max_tokens: int | None = None, max_frames: int | None = None, system_prompt: str | None = None,
                  threads: int = 8, progress: Any = None, parsed: ReadResult | None = None) -> Report:
    """Check every row of a dataset for training `arch`; `processor` makes token counts exact. `parsed` is the
    dataset already read with `read_samples(uri, task)` (the driver keeps it to hand the valid rows on)."""
    from vray.data.collate import Collator

    parsed = read_samples(uri, task=task) if parsed is None else parsed
    report = Report(parsed.source, rows=parsed.rows, budget=max_tokens)
    for problem in parsed.problems:
        where, _, message = str(problem).partition(": ")
        report.issues.append(Issue(where, "error", problem.kind or "schema", message))
    collator = None
    if processor is not None:
        collator = Collator(processor, arch, system_prompt, max_tokens=max_tokens, max_frames=max_frames)
    else:
        report.token_counts = "estimated"
    wheres = {s.id: w for s, w in zip(parsed.samples, parsed.wheres)}

    def one(sample: Sample) -> tuple[list[Issue], int | None]:
        return _check_sample(sample, wheres[sample.id], arch, collator, max_tokens, max_frames)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for issues, tokens in pool.map(one, parsed.samples):
            report.issues.extend(issues)
            if tokens is not None:
                report.tokens.append(tokens)
            if progress is not None:
                progress()
    return report
