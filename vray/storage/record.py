"""A trained run read once: its spec (spec.yaml), its plan (plan.json) and its complete checkpoints.

Serving, evaluation and export all start from a run directory; `RunRecord.read(run)` is the one place that
parses its files, so every reader sees the same validated spec and the same checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from vray.errors import VrayError
from vray.plan.plan import Plan
from vray.spec import RunSpec, validate_spec
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir


@dataclass(frozen=True)
class RunRecord:
    """What a run directory holds. Checkpoint folders are local paths or URIs (remote runs), as text."""

    run: RunDir
    spec: RunSpec
    plan: Plan | None  # None for runs written without one (test kits, older runs)
    checkpoints: tuple[tuple[int, str], ...]  # (step, folder) of every complete checkpoint, oldest first
    best: str | None  # the checkpoint `best` points at, when it is complete
    final: str | None  # final/, when it is complete

    @classmethod
    def read(cls, where: str | RunDir) -> RunRecord:
        """Read the run directory at a path or URI; a VrayError when it is not one."""
        run = where if isinstance(where, RunDir) else RunDir.of(where)
        if not run.exists("spec.yaml"):
            raise VrayError(f"{run.uri} has no spec.yaml; is it a vray run directory?")
        plan = Plan.from_dict(json.loads(run.read_text("plan.json"))) if run.exists("plan.json") else None
        best = run.best_checkpoint()
        return cls(
            run=run,
            spec=validate_spec(yaml.safe_load(run.read_text("spec.yaml"))),
            plan=plan,
            checkpoints=tuple((step, str(folder)) for step, folder in run.complete_checkpoints()),
            best=None if best is None else str(best),
            final=run.join("final") if run.exists(f"final/{CHECKPOINT_MARKER}") else None,
        )

    @property
    def latest(self) -> str | None:
        """The newest complete checkpoint."""
        return self.checkpoints[-1][1] if self.checkpoints else None
