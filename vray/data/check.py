"""Dataset validation: every problem of every row, with its row, before any training starts.

Errors: invalid JSON or schema (empty answer, degenerate box, tags that do not match the media), duplicate
id, missing / unreadable / corrupt image or video, unsupported format, box outside its image, sample over
the token budget. Warnings: a sample above 90% of the budget, a conversation whose earlier answers the chat
template rewrites (only the last one is then learned).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from vray.archs.registry import Architecture
from vray.data.io import ReadResult, read_samples
from vray.data.sample import Sample, is_remote
from vray.errors import DataError, VrayError

BOX_TOLERANCE = 0.5  # pixels a box may overhang its image (rounding in exporters)
MEDIA_READ = ("unreadable image", "unreadable video", "missing image")
BATCH_ROWS = 64  # rows a Ray task checks (decoding their media and encoding them takes a few seconds)


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
    token_rows: list[str] = field(default_factory=list)  # the row of each entry of `tokens`
    budget: int | None = None
    token_counts: str = "processor"  # "processor" (exact) or "estimated"
    cached: str | None = None  # the cache entry this report was read from (None: checked now)

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
            "cached": self.cached,
            "tokens": {"max": toks[-1], "median": toks[len(toks) // 2], "budget": self.budget,
                       "counted_with": self.token_counts} if toks else None,
        }

    def to_json(self) -> str:
        return json.dumps({**self.summary(), "issues": [asdict(i) for i in self.issues]}, indent=2)


def _estimate_tokens(sample: Sample, arch: Architecture, sizes: list[tuple[int, int]]) -> int:
    """Visual tokens from the family's resize rule and ~3.5 characters a text token (no processor at hand)."""
    from vray.archs.vision import visual_tokens

    visual = sum(visual_tokens(arch, w, h, alone=len(sizes) == 1) for w, h in sizes)
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


def counting_processor(source: str, revision: str | None = None, media: Any = None,
                       arch: Architecture | None = None) -> tuple[Any, str | None]:
    """(the processor that counts a sample's tokens exactly, with the family's default image size when `arch` is
    given, None) or, when the model is out of reach (an offline hub), (None, why): token counts are then estimated."""
    from vray.models.loader import load_processor, resolve_processor_source

    try:
        return load_processor(resolve_processor_source(source, revision), media, arch=arch), None
    except VrayError as exc:
        return None, str(exc)


@dataclass(frozen=True)
class RowChecker:
    """What checking a row needs besides the row: pickled once and shared by every Ray task of a check."""

    arch: Architecture
    collator: Any  # the run's Collator (exact token counts), or None (estimated)
    max_tokens: int | None
    max_frames: int | None

    def check(self, rows: list[tuple[Sample, str]]) -> list[tuple[list[Issue], int | None]]:
        """(issues, tokens) of each (sample, where), in order."""
        return [_check_sample(sample, where, self.arch, self.collator, self.max_tokens, self.max_frames)
                for sample, where in rows]


def check_rows(checker: RowChecker, rows: list[tuple[Sample, str]]) -> list[tuple[list[Issue], int | None]]:
    """One Ray task's work: a batch of rows checked in order."""
    return checker.check(rows)


Progress = Callable[[int, int], None]  # (rows checked so far, rows to check)


@contextmanager
def shown_progress(console: Any, label: str) -> Iterator[Progress]:
    """A `Progress` callback drawn on `console` (a rich Console, usually stderr): a bar on a terminal, else a
    line at every tenth of the rows (the logs of `ray job submit`, CI)."""
    if console is None:
        yield lambda done, total: None
        return
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=console, transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    shown = [-1]

    def line(done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        if tenth > shown[0] and (done or not total):
            shown[0] = tenth
            console.print(f"{label}: {done}/{total} rows", highlight=False)

    yield line


def check_dataset(uri: str, arch: Architecture, processor: Any = None, task: str | None = None,
                  max_tokens: int | None = None, max_frames: int | None = None, system_prompt: str | None = None,
                  progress: Progress | None = None, parsed: ReadResult | None = None, use_ray: bool = False,
                  start_ray: Callable[[], Any] | None = None, batch_rows: int = BATCH_ROWS, cache: bool = True,
                  media_limits: dict[str, Any] | None = None) -> Report:
    """Check every row of a dataset for training `arch`; `processor` makes token counts exact. `parsed` is the
    dataset already read with `read_samples(uri, task)` (the driver keeps it to hand the valid rows on).

    With `use_ray`, batches of `batch_rows` rows are checked as Ray tasks on the cluster's CPUs (`start_ray` joins
    or starts Ray first, only when tasks are needed; without it Ray must be up); otherwise, or for a single batch,
    in this process. The report is the same either way: every problem with its row, in row order. With `cache`, the
    report of the same file bytes, media and settings is read back from vray's cache (`Report.cached` says so).
    `progress(done, total)` is called as rows are checked. `media_limits` (the spec's media block, which the
    processor was loaded with) is part of the cache key."""
    from vray.data.collate import Collator

    parsed = read_samples(uri, task=task) if parsed is None else parsed
    refs = _media_refs(parsed.samples)
    key = cache_key(parsed, refs, arch, processor, task, max_tokens, max_frames, system_prompt,
                    media_limits) if cache else None
    hit = load_cached(key) if key is not None else None
    if hit is not None:
        if progress is not None:
            progress(hit.rows, hit.rows)
        return hit
    report = Report(parsed.source, rows=parsed.rows, budget=max_tokens)
    for problem in parsed.problems:
        where, _, message = str(problem).partition(": ")
        report.issues.append(Issue(where, "error", problem.kind or "schema", message))
    collator = None
    if processor is not None:
        collator = Collator(processor, arch, system_prompt, max_tokens=max_tokens, max_frames=max_frames)
    else:
        report.token_counts = "estimated"
    checker = RowChecker(arch, collator, max_tokens, max_frames)
    rows = list(zip(parsed.samples, parsed.wheres))
    batches = [rows[i:i + batch_rows] for i in range(0, len(rows), max(1, batch_rows))]
    total, done = len(rows), 0
    if progress is not None:
        progress(0, total)
    if use_ray and len(batches) > 1:
        from vray.data.pipeline import ray_map

        if start_ray is not None:
            start_ray()
        results = ray_map(check_rows, checker, batches, local=not is_remote(parsed.source),
                          finished=lambda n: progress(n, total) if progress is not None else None,
                          sizes=[len(b) for b in batches])
        for rows_of, batch in zip(batches, results):
            _add(report, batch, rows_of)
    else:
        for batch in batches:
            _add(report, checker.check(batch), batch)
            done += len(batch)
            if progress is not None:
                progress(done, total)
    # Media an object store failed to hand over may be there next time: such a report is not kept.
    passing = any(is_remote(r) for r in refs) and any(i.kind in MEDIA_READ for i in report.errors)
    if key is not None and not passing:
        store_cached(key, report)
    return report


def _add(report: Report, results: list[tuple[list[Issue], int | None]], rows: list[tuple[Any, str]]) -> None:
    for (issues, tokens), (_, where) in zip(results, rows):
        report.issues.extend(issues)
        if tokens is not None:
            report.tokens.append(tokens)
            report.token_rows.append(where)


# ---- the cache of reports ------------------------------------------------------------------------------------
# A dataset file's report is kept under vray's cache, keyed by everything that can change it: the file's path and
# the sha256 of its bytes; each media file it references, by path, size and modification time (local) or ETag /
# size (object stores), so a replaced image misses without every image being read again; the architecture; the
# processor (its class, tokenizer, chat template and image/video settings) and the media limits it was loaded
# with; the task, token budget, frame limit and system prompt; and this check's version.

CHECK_VERSION = 2  # raise when a change to the check changes what it reports


def _processor_fingerprint(processor: Any) -> str | None:
    if processor is None:
        return None
    tok = getattr(processor, "tokenizer", None)
    parts = [type(processor).__name__, getattr(tok, "name_or_path", ""), str(len(tok) if tok is not None else 0),
             getattr(processor, "chat_template", None) or "", getattr(tok, "chat_template", None) or ""]
    try:
        parts.append(processor.to_json_string())  # image / video processor settings, the media limits included
    except Exception:  # noqa: BLE001 - a processor without a JSON form: its sub-processors' settings
        parts += [repr(getattr(getattr(processor, name, None), "__dict__", ""))
                  for name in ("image_processor", "video_processor")]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _media_refs(samples: list[Sample]) -> list[str]:
    refs: set[str] = set()
    for sample in samples:
        refs.update(sample.images)
        for video in sample.videos:
            if video.path:
                refs.add(video.path)
            refs.update(video.frames or ())
    return sorted(r for r in refs if not r.startswith("data:"))  # embedded media are in the file's bytes


def _media_fingerprint(refs: list[str]) -> str | None:
    """A digest of every referenced media file's identity (path, size, mtime or ETag; "missing" when absent);
    None when some cannot be listed cheaply (http(s) URLs): the report is then not cached."""
    from vray.fs import filesystem

    h = hashlib.sha256()
    by_folder: dict[str, list[str]] = {}
    for ref in refs:
        if is_remote(ref):
            if ref.split("://", 1)[0] in ("http", "https"):
                return None
            by_folder.setdefault(ref.rsplit("/", 1)[0], []).append(ref)
            continue
        try:
            st = os.stat(ref)
            h.update(f"{ref}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{ref}\0missing\n".encode())
    for folder, members in sorted(by_folder.items()):  # one listing a folder, not one request a file
        fs, path = filesystem(folder)
        try:
            listing = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in fs.ls(path, detail=True)}
        except (FileNotFoundError, OSError):
            listing = {}
        for ref in members:
            e = listing.get(ref.rsplit("/", 1)[-1])
            ident = (f"{e.get('size')}\0{e.get('ETag') or e.get('etag') or e.get('LastModified') or e.get('mtime')}"
                     if e else "missing")
            h.update(f"{ref}\0{ident}\n".encode())
    return h.hexdigest()


def cache_key(parsed: ReadResult, refs: list[str], arch: Architecture, processor: Any, task: str | None, max_tokens: int | None,
              max_frames: int | None, system_prompt: str | None, media_limits: dict[str, Any] | None = None) -> str | None:
    """The cache key of a dataset file's report, or None when it cannot be cached (its bytes were not hashed, or
    it references media by http(s) URL)."""
    if parsed.sha256 is None:
        return None
    media = _media_fingerprint(refs)
    if media is None:
        return None
    settings = {"check": CHECK_VERSION, "source": parsed.source, "sha256": parsed.sha256, "media": media,
                "arch": arch.key, "processor": _processor_fingerprint(processor), "task": task,
                "max_tokens": max_tokens, "max_frames": max_frames, "system_prompt": system_prompt,
                "media_limits": media_limits}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _cache_file(key: str) -> Any:
    from vray.models.cache import cache_root

    return cache_root() / "data-check" / f"{key}.json"


def load_cached(key: str) -> Report | None:
    """The cached report under `key`, or None (absent or unreadable)."""
    path = _cache_file(key)
    try:
        raw = json.loads(path.read_text())
        report = Report(raw["source"], rows=raw["rows"], issues=[Issue(**i) for i in raw["issues"]],
                        tokens=list(raw["tokens"]), token_rows=list(raw.get("token_rows") or []), budget=raw["budget"], token_counts=raw["token_counts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    report.cached = str(path)
    return report


def store_cached(key: str, report: Report) -> None:
    """Keep `report` under `key` (written to a temporary name, then renamed: a reader never sees half a file)."""
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"source": report.source, "rows": report.rows, "budget": report.budget,
                                   "token_counts": report.token_counts, "tokens": report.tokens, "token_rows": report.token_rows,
                                   "issues": [asdict(i) for i in report.issues]}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run a check
