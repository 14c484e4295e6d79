"""The checkpoint protocol: stage, write, publish with the marker last, keep the latest and the best N.

A checkpoint is written by every rank of a run (each rank saves its shards) and becomes visible only when it is
complete:
- on a local run directory, every rank writes into one staging folder beside the target, and rank 0 renames it
  into place and writes the marker (`vray_checkpoint.json`);
- on a remote one (s3://...), every rank writes a local folder and uploads what it wrote, then rank 0 writes the
  marker.
Readers (resume, serving, evaluation) take only folders with the marker. The trainer and the test kit write
checkpoints through this one class; a single process is a group of one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vray.fs import filesystem
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir, read_checkpoint_info


def _alone() -> None:
    return None


class CheckpointWriter:
    """Writes the checkpoints of one run directory from one rank of the run's process group."""

    def __init__(self, run: RunDir, rank: int = 0, barrier: Callable[[], None] = _alone):
        self.run = run
        self.rank = rank
        self.barrier = barrier

    def stage(self, name: str) -> Path:
        """A folder this rank writes the checkpoint `name` into: one shared folder on a local run (inside it, so the
        final rename is atomic), one per rank on a remote one (uploaded by `publish`)."""
        if self.run.local:
            folder = self.run.checkpoints / f".{name}.tmp"
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            self.barrier()
            return folder
        return Path(tempfile.mkdtemp(prefix=f"vray-{name}-rank{self.rank}-"))

    def publish(self, staged: Path, rel: str, info: dict[str, Any]) -> str:
        """Make what every rank wrote into `staged` the checkpoint at `rel` (relative to the run), marker last.
        Every rank calls it; it returns the checkpoint's path or URI."""
        self.barrier()
        marker = json.dumps(info, indent=2) + "\n"
        if self.run.local:
            if self.rank == 0:
                (staged / CHECKPOINT_MARKER).write_text(marker)
                target = self.run.root / rel
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged.replace(target)
            self.barrier()
            return str(self.run.root / rel)
        if self.rank == 0:
            self.run.remove(rel)
        self.barrier()
        fs, path = filesystem(self.run.join(rel))
        for file in sorted(staged.rglob("*")):  # each rank uploads what it wrote (its shards)
            if file.is_file():
                fs.put(str(file), f"{path}/{file.relative_to(staged).as_posix()}")
        shutil.rmtree(staged, ignore_errors=True)
        self.barrier()
        if self.rank == 0:
            self.run.write_text(f"{rel}/{CHECKPOINT_MARKER}", marker)
        self.barrier()
        return self.run.join(rel)

    def write(self, rel: str, save: Callable[[Path], None], info: dict[str, Any]) -> str:
        """Stage, let `save(folder)` write this rank's part, and publish: the whole protocol in one call."""
        staged = self.stage(rel.rsplit("/", 1)[-1])
        save(staged)
        return self.publish(staged, rel, info)

    def retain(self, metric: str, keep_best: int) -> None:
        """Rank 0: keep the latest complete checkpoint, the best `keep_best` by `metric` (higher is better) and the
        one `best` points at; remove the others."""
        if self.rank != 0:
            return
        found = self.run.complete_checkpoints()
        if len(found) <= 1:
            return
        scored = []
        for step, path in found:
            value = read_checkpoint_info(path)["metrics"].get(metric)
            scored.append((value if value is not None else float("-inf"), step, path))
        keep = {found[-1][0]} | {step for _, step, _ in sorted(scored, key=lambda t: (-t[0], t[1]))[:keep_best]}
        best = self.run.best_checkpoint()
        for step, path in found:
            if step not in keep and str(path) != str(best):
                self.run.remove(f"checkpoints/step-{step}")
