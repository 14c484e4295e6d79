"""What a run logs: metrics.jsonl (rank 0 writes it; the driver renders progress from it), TensorBoard events, and
experiment trackers: MLflow and Weights & Biases, through Ray's integrations (`setup_mlflow`, `setup_wandb`) when
installed and configured (MLFLOW_TRACKING_URI; WANDB_API_KEY or WANDB_MODE)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from vray.cluster import in_ray_train_worker
from vray.storage.rundir import RunDir


class Trackers:
    """Logs numeric metrics to every configured tracker (rank 0 only)."""

    def __init__(self, run_name: str, config: dict[str, Any]):
        self._mlflow: Any = None
        self._wandb: Any = None
        if os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                self._mlflow = self._open_mlflow(run_name, config)
            except ImportError:
                self._mlflow = None
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
            try:
                self._wandb = self._open_wandb(run_name, config)
            except ImportError:
                self._wandb = None

    @staticmethod
    def _open_mlflow(run_name: str, config: dict[str, Any]) -> Any:
        import mlflow  # fails here, before any setup, when MLflow is not installed

        uri = os.environ["MLFLOW_TRACKING_URI"]
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "vray")
        if in_ray_train_worker():
            from ray.air.integrations.mlflow import setup_mlflow

            return setup_mlflow(config={}, tracking_uri=uri, experiment_name=experiment, run_name=run_name,
                                create_experiment_if_not_exists=True, tags={"vray.architecture": config.get("architecture", "")})
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        mlflow.start_run(run_name=run_name, tags={"vray.architecture": config.get("architecture", "")})
        return mlflow

    @staticmethod
    def _open_wandb(run_name: str, config: dict[str, Any]) -> Any:
        import wandb

        project = os.environ.get("WANDB_PROJECT", "vray")
        if in_ray_train_worker():
            from ray.air.integrations.wandb import setup_wandb

            return setup_wandb(config=config, project=project, name=run_name)
        return wandb.init(project=project, name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._mlflow is not None and hasattr(self._mlflow, "end_run"):
            self._mlflow.end_run()
        if self._wandb is not None and hasattr(self._wandb, "finish"):
            self._wandb.finish()


class MetricsLog:
    """metrics.jsonl, written by rank 0 (the driver renders progress from it): appended locally; on a remote run
    directory written to a local file and uploaded whole every few seconds and at checkpoints."""

    def __init__(self, run: RunDir, rank: int, upload_every_s: float = 5.0):
        self.run = run
        self.rank = rank
        self.upload_every_s = upload_every_s
        self._last_upload = 0.0
        self.path = run.metrics if run.local else Path(tempfile.mkdtemp(prefix="vray-metrics-")) / "metrics.jsonl"
        if not run.local and rank == 0 and run.exists("metrics.jsonl"):  # a resumed run continues its log
            self.path.write_text(run.read_text("metrics.jsonl"))
        self._tb: Any = None
        self._trackers: Any = None

    def write(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self._tensorboard(record)
        if record.get("step") is not None:
            if self._trackers is None:
                self._trackers = Trackers(self.run.name, {"run": self.run.uri})
            numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k not in ("time", "step")}
            self._trackers.log(numeric, int(record["step"]))
        if not self.run.local and time.time() - self._last_upload > self.upload_every_s:
            self.flush()

    def _tensorboard(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if step is None:
            return
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self._tb = False
                return
            folder = (self.run.root / "tensorboard") if self.run.local else self.path.parent / "tensorboard"
            self._tb = SummaryWriter(str(folder))
        if self._tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step"):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def flush(self) -> None:
        """Upload the log (and TensorBoard events) of a remote run directory."""
        if self.rank != 0:
            return
        if self._tb:
            self._tb.flush()
        if not self.run.local:
            self.run.upload(self.path, "metrics.jsonl")
            events = self.path.parent / "tensorboard"
            for file in events.glob("*") if events.exists() else []:
                self.run.upload(file, f"tensorboard/{file.name}")
            self._last_upload = time.time()

    def close(self) -> None:
        self.flush()
        if self._tb:
            self._tb.close()
        if self._trackers is not None:
            self._trackers.close()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a restart replays them: each step stays logged once)."""
        if self.rank != 0 or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") is None or rec["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))
