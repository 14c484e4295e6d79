"""Read and write vray datasets: JSONL or Parquet, on a local disk or s3:// (fsspec / s3fs, pyarrow)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vray.data.sample import Sample, is_remote, parse_row
from vray.errors import DataError
from vray.fs import filesystem

DATA_FILES = ("data.jsonl", "data.parquet")


def dataset_file(uri: str) -> str:
    """The data file a path names: itself, or data.jsonl / data.parquet inside a folder."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"data: {uri!r} does not exist")
    if fs.isdir(path):
        for name in DATA_FILES:
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                return f"{uri.rstrip('/')}/{name}"
        raise DataError(f"data: folder {uri!r} has neither data.jsonl nor data.parquet")
    return uri


def base_of(uri: str) -> str:
    """The folder relative references of a dataset file resolve against."""
    if is_remote(uri):
        return uri.rsplit("/", 1)[0]
    return str(Path(uri).expanduser().resolve().parent)


def iter_rows(uri: str, digest: Any = None) -> Iterator[tuple[str, Any]]:
    """(`file:line` or `file:row N`, parsed row) for every row; undecodable JSON lines yield a DataError. `digest`
    (a hashlib object) is fed the file's bytes as they are read, so hashing the file costs no second read."""
    fs, path = filesystem(uri)
    if uri.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as fh:
            raw = fh.read()
        if digest is not None:
            digest.update(raw)
        table = pq.read_table(pa.BufferReader(raw))
        del raw
        for i, row in enumerate(table.to_pylist(), 1):
            yield f"{uri}:row {i}", _drop_nulls(row)
        return
    with fs.open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if digest is not None:
                digest.update(line)
            if not line.strip():
                continue
            try:
                yield f"{uri}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{uri}:{lineno}", DataError(f"{uri}:{lineno}: not valid JSON ({exc.msg})", kind="invalid JSON")
            except UnicodeDecodeError:
                yield f"{uri}:{lineno}", DataError(f"{uri}:{lineno}: not valid JSON (not UTF-8 text)",
                                                   kind="invalid JSON")


def _drop_nulls(value: Any) -> Any:
    """Parquet gives every struct field to every row; absent fields come back as None."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


@dataclass
class ReadResult:
    """The samples of a dataset and one DataError per bad row (its kind: invalid JSON, schema, wrong task,
    duplicate id)."""

    source: str
    samples: list[Sample] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)  # the row of each sample (file:line)
    problems: list[DataError] = field(default_factory=list)
    rows: int = 0
    sha256: str | None = None  # of the file's bytes, read once with the rows

    def samples_or_raise(self) -> list[Sample]:
        """The samples, or a DataError listing the bad rows (the first 20) and how to proceed."""
        if self.problems:
            shown = "\n".join(f"  - {m}" for m in self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise DataError(
                f"{len(self.problems)} bad row(s) of {self.rows} in {self.source}; fix them, or train with --skip-invalid "
                f"to leave them out (each is counted and reported):\n{shown}{more}"
            )
        if not self.samples:
            raise DataError(f"data: {self.source} holds no samples")
        return self.samples

    def kept(self, exclude: Collection[str] = ()) -> list[Sample]:
        """The samples whose id is not in `exclude` (the ids the driver's check refused)."""
        return [s for s in self.samples if s.id not in exclude]


def read_samples(uri: str, task: str | None = None) -> ReadResult:
    """Parse every row of a dataset (schema problems per row; images are not opened here)."""
    source = dataset_file(uri)
    base = base_of(source)
    result = ReadResult(source)
    seen: dict[str, str] = {}
    digest = hashlib.sha256()
    for where, row in iter_rows(source, digest):
        result.rows += 1
        if isinstance(row, DataError):
            result.problems.append(row)
            continue
        try:
            sample = parse_row(row, where)
        except DataError as exc:
            result.problems.append(DataError(str(exc), kind="schema"))
            continue
        if task is not None and sample.task != task:
            result.problems.append(DataError(f"{where}: sample '{sample.id}' is a {sample.task} sample but the run's "
                                             f"task is {task}", kind="wrong task"))
            continue
        if sample.id in seen:
            result.problems.append(DataError(f"{where}: duplicate id '{sample.id}' (first at {seen[sample.id]})",
                                             kind="duplicate id"))
            continue
        seen[sample.id] = where
        result.samples.append(sample.resolved(base))
        result.wheres.append(where)
    result.sha256 = digest.hexdigest()
    return result


def sample_row(sample: Sample) -> dict[str, Any]:
    """The plain row of a sample (what a JSONL line or Parquet row holds)."""
    row = sample.model_dump(mode="json", exclude_defaults=False)
    if not row.get("videos"):
        row.pop("videos", None)
    for turn in row["conversation"]:
        if not turn.get("boxes"):
            turn.pop("boxes", None)
    return row


def write_samples(samples: list[Sample], folder: str, parquet: bool = False) -> str:
    """Write DEST/data.jsonl (or data.parquet); image paths under DEST become relative to it."""
    fs, path = filesystem(folder)
    fs.makedirs(path, exist_ok=True)
    rows = [sample_row(_relative_to(s, folder)) for s in samples]
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = f"{folder.rstrip('/')}/data.parquet"
        with fs.open(f"{path.rstrip('/')}/data.parquet", "wb") as fh:
            pq.write_table(pa.Table.from_pylist(rows), fh)
        return target
    target = f"{folder.rstrip('/')}/data.jsonl"
    with fs.open(f"{path.rstrip('/')}/data.jsonl", "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


def _relative_to(sample: Sample, folder: str) -> Sample:
    if is_remote(folder):
        prefix = folder.rstrip("/") + "/"
        rel = lambda ref: ref[len(prefix):] if ref.startswith(prefix) else ref  # noqa: E731
    else:
        root = os.path.abspath(folder)
        rel = lambda ref: (os.path.relpath(ref, root)  # noqa: E731
                           if not is_remote(ref) and not ref.startswith("data:") and os.path.abspath(ref).startswith(root + os.sep)
                           else ref)
    videos = tuple(v.model_copy(update={"path": rel(v.path) if v.path else None,
                                        "frames": tuple(rel(f) for f in v.frames) if v.frames else None})
                   for v in sample.videos)
    return sample.model_copy(update={"images": tuple(rel(i) for i in sample.images), "videos": videos})


def count_rows(uri: str | None) -> tuple[int, str] | None:
    """(rows, where the number comes from) of a training set the planner may count cheaply: a synthetic dataset's
    size, or the non-empty lines of a local JSONL file; None otherwise (remote data, Parquet, folders)."""
    if not uri:
        return None
    if uri.startswith("synthetic:"):
        from vray.data.synthetic import parse_uri

        return parse_uri(uri).train, "synthetic dataset size"
    path = Path(uri).expanduser() if "://" not in uri else None
    if path is not None and path.is_file():
        with open(path) as fh:
            return sum(1 for line in fh if line.strip()), f"lines of {path.name}"
    return None


def read_jsonl(path: str | Path, task: str | None = None) -> list[Sample]:
    """Every sample of a vray dataset (JSONL or Parquet, local or s3://); one DataError listing bad rows."""
    return read_samples(str(path), task=task).samples_or_raise()
