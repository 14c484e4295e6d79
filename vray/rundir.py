"""The run directory: spec.yaml, plan.json, metrics.jsonl, checkpoints/step-N/, best, final/, curves.png."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vray.errors import VrayError

CHECKPOINT_MARKER = "vray_checkpoint.json"  # written last: a checkpoint folder without it is incomplete
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (a local folder)."""

    root: Path

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunDir:
        """The run directory at `path`; a VrayError for an s3:// URI until remote run directories land."""
        text = str(path)
        if "://" in text:
            raise VrayError(f"output: {text} is remote; this version writes run directories to a local folder only")
        return cls(Path(text).expanduser())

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

    def checkpoint(self, step: int) -> Path:
        """Folder of the checkpoint taken after optimizer step `step`."""
        return self.checkpoints / f"step-{step}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            m = _STEP.match(child.name)
            if m and (child / CHECKPOINT_MARKER).exists():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, if any."""
        found = self.complete_checkpoints()
        return found[-1][1] if found else None

    def best_checkpoint(self) -> Path | None:
        """The checkpoint `best` points at, if it exists and is complete."""
        if self.best.is_symlink() or self.best.exists():
            target = self.best.resolve()
            if (target / CHECKPOINT_MARKER).exists():
                return target
        return None

    def point_best_at(self, checkpoint: Path) -> None:
        """Atomically make `best` a relative link to `checkpoint`."""
        tmp = self.root / f".best-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(os.path.relpath(checkpoint, self.root))
        os.replace(tmp, self.best)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (a partially written last line is skipped)."""
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def read_checkpoint_info(folder: Path) -> dict[str, Any]:
    """The `vray_checkpoint.json` of a checkpoint (or final/) folder."""
    marker = Path(folder) / CHECKPOINT_MARKER
    if not marker.exists():
        raise VrayError(f"{folder} is not a complete vray checkpoint (no {CHECKPOINT_MARKER})")
    return json.loads(marker.read_text())
