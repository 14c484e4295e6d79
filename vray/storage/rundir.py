"""The run directory: spec.yaml, plan.json, metrics.jsonl, checkpoints/step-N/, best, final/, curves.png.

A run directory is a local folder or an s3:// prefix. A checkpoint folder counts only with its marker file
`vray_checkpoint.json`, which `vray.storage.checkpoint` writes last. `best` is a relative link locally and a
small JSON pointer on S3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vray.errors import VrayError
from vray.fs import filesystem as _fs
from vray.storage.retry import with_retries

CHECKPOINT_MARKER = "vray_checkpoint.json"  # written last: a checkpoint folder without it is incomplete
RECEIPTS = ".uploaded"  # inside a remote checkpoint: one receipt per rank whose files are all uploaded
_STEP = re.compile(r"^step-(\d+)$")
T = TypeVar("T")


@dataclass(frozen=True)
class RunDir:
    """Paths and files of one run directory (a local folder, or a URI such as s3://bucket/runs/name)."""

    uri: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunDir:
        """The run directory at a path or URI."""
        text = str(path)
        if "://" in text:
            return cls(text.rstrip("/"))
        return cls(str(Path(text).expanduser().resolve()))

    def __post_init__(self) -> None:
        if isinstance(self.uri, Path):  # RunDir(Path(...)) keeps working
            object.__setattr__(self, "uri", str(self.uri))

    @property
    def local(self) -> bool:
        return "://" not in self.uri

    @property
    def root(self) -> Path:
        """The folder of a local run directory."""
        if not self.local:
            raise VrayError(f"{self.uri} is remote; it has no local folder")
        return Path(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> str:
        """A path or URI inside the run directory."""
        return "/".join([self.uri.rstrip("/"), *parts])

    # ---- well-known files (local paths; remote runs read and write through the methods below) ----
    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    # ---- files -----------------------------------------------------------------------------------
    def _retried(self, op: Callable[[], T], rel: str, what: str) -> T:
        """`op()` as it is locally; retried through an object-store outage remotely (vray.storage.retry)."""
        if self.local:
            return op()
        return with_retries(op, self.join(rel), f"{what} {self.join(rel)}")

    def exists(self, rel: str) -> bool:
        fs, path = _fs(self.join(rel))
        return self._retried(lambda: fs.exists(path), rel, "looking for")

    def read_text(self, rel: str) -> str:
        fs, path = _fs(self.join(rel))

        def read() -> str:
            with fs.open(path, "rt") as fh:
                return fh.read()
        return self._retried(read, rel, "reading")

    def write_text(self, rel: str, text: str) -> None:
        """Write a small file whole (atomically on a local disk)."""
        if self.local:
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, target)
            return
        fs, path = _fs(self.join(rel))
        data = text.encode()
        self._retried(lambda: fs.pipe_file(path, data), rel, "writing")  # one whole object: never torn

    def upload(self, local_file: str | Path, rel: str) -> None:
        """Copy a local file into the run directory."""
        if self.local:
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(local_file).resolve() != target.resolve():
                shutil.copyfile(local_file, target)
            return
        fs, path = _fs(self.join(rel))
        self._retried(lambda: fs.put_file(str(local_file), path), rel, "uploading")  # a whole object, or none

    def remove(self, rel: str) -> None:
        """Delete a file or folder of the run directory (no error when it is absent)."""
        if self.local:
            shutil.rmtree(self.root / rel, ignore_errors=True)
            return
        fs, path = _fs(self.join(rel))

        def rm() -> None:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        self._retried(rm, rel, "removing")

    def listdir(self) -> list[str]:
        """Names of the entries directly inside (empty when it does not exist)."""
        fs, path = _fs(self.uri)
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

    # ---- checkpoints -----------------------------------------------------------------------------
    def complete_checkpoints(self, retried: bool = True) -> list[tuple[int, Any]]:
        """(step, folder: a Path locally, a URI remotely) of every complete checkpoint, oldest first; `retried=False`
        takes one look, without waiting out an object-store outage."""
        fs, path = _fs(self.join("checkpoints"))

        def listing() -> list[tuple[int, Any]]:
            if not fs.exists(path):
                return []
            found = []
            for entry in fs.ls(path, detail=False):
                name = entry.rstrip("/").rsplit("/", 1)[-1]
                m = _STEP.match(name)
                if m and fs.exists(f"{entry.rstrip('/')}/{CHECKPOINT_MARKER}"):
                    where = self.join("checkpoints", name)
                    found.append((int(m.group(1)), Path(where) if self.local else where))
            return sorted(found)
        return self._retried(listing, "checkpoints", "listing") if retried else listing()

    def latest_checkpoint(self, retried: bool = True) -> Any:
        """The newest complete checkpoint (a Path locally, a URI remotely), if any."""
        found = self.complete_checkpoints(retried)
        return found[-1][1] if found else None

    def best_checkpoint(self) -> Any:
        """The checkpoint `best` points at, if it exists and is complete."""
        if self.local:
            if self.best.is_symlink() or self.best.exists():
                target = self.best.resolve()
                if (target / CHECKPOINT_MARKER).exists():
                    return target
            return None
        if not self.exists("best"):
            return None
        rel = json.loads(self.read_text("best"))["checkpoint"]
        return self.join(rel) if self.exists(f"{rel}/{CHECKPOINT_MARKER}") else None

    def point_best_at(self, rel: str) -> None:
        """Make `best` point at the checkpoint at `rel` (relative to the run): an atomic link or a JSON pointer."""
        if self.local:
            tmp = self.root / f".best-{os.getpid()}"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(rel)
            os.replace(tmp, self.best)
            return
        self.write_text("best", json.dumps({"checkpoint": rel}) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (a partially written last line is skipped)."""
        if not self.exists("metrics.jsonl"):
            return []
        records = []
        for line in self.read_text("metrics.jsonl").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def read_checkpoint_info(folder: str | Path) -> dict[str, Any]:
    """The `vray_checkpoint.json` of a checkpoint (or final/) folder, local or remote."""
    fs, path = _fs(str(folder))
    marker = f"{path.rstrip('/')}/{CHECKPOINT_MARKER}"
    if not fs.exists(marker):
        raise VrayError(f"{folder} is not a complete vray checkpoint (no {CHECKPOINT_MARKER})")
    with fs.open(marker, "rt") as fh:
        return json.loads(fh.read())


_OTHER_RANKS = re.compile(r"(?:zero_pp_rank_|rng-rank)(\d+)")  # files of one rank, by name


def _needed_by(rel: str, rank: int | None) -> bool:
    """Whether a resuming rank reads the checkpoint file `rel`: DeepSpeed's ZeRO partitions and the random states
    are one file per rank, and a rank reads only its own (DeepSpeed, without elastic checkpoints, loads only its own
    partition file). DCP shards are fetched whole: which file holds a rank's slices depends on the new sharding
    and on DCP's deduplication of replicated tensors, known only once the model is sharded."""
    if rank is None:
        return True
    m = _OTHER_RANKS.search(rel.rsplit("/", 1)[-1])
    return m is None or int(m.group(1)) == rank


def fetch_checkpoint(uri: str, cache: Path | None = None, rank: int | None = None) -> Path:
    """A local copy of a remote checkpoint folder (cached by URI, once per node); a local path as it is.

    `rank`: only what that rank of a resuming run reads (the shared files and its own per-rank files); the ranks
    of one node share the copy. Without it, the whole folder (serving, evaluation, export)."""
    if "://" not in uri:
        return Path(uri)
    import hashlib

    from filelock import FileLock

    from vray.models.cache import cache_root

    folder = (cache or cache_root()) / "checkpoints" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    folder.parent.mkdir(parents=True, exist_ok=True)  # the temporary copy lives beside it: the renames stay atomic
    done = folder / (".fetched-all" if rank is None else f".fetched-rank{rank}")
    with FileLock(str(folder) + ".lock"):  # the replicas / workers of one node fetch it once
        if not done.exists() and not (folder / ".fetched-all").exists():
            fs, path = _fs(uri)
            root = path.rstrip("/")
            remote = [f for f in fs.find(root) if f.rstrip("/") != root]
            wanted = {f: f[len(root) + 1:] for f in remote if _needed_by(f[len(root) + 1:], rank)}
            missing = {f: rel for f, rel in wanted.items() if not (folder / rel).exists()}
            tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
            if missing:
                fs.get(list(missing), [str(tmp / rel) for rel in missing.values()])
            for rel in missing.values():  # the marker last: a copy with it is whole
                if rel != CHECKPOINT_MARKER:
                    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp / rel, folder / rel)
            if CHECKPOINT_MARKER in missing.values():
                os.replace(tmp / CHECKPOINT_MARKER, folder / CHECKPOINT_MARKER)
            shutil.rmtree(tmp, ignore_errors=True)
            done.touch()
    return folder
