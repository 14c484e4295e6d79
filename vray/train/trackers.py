"""Experiment trackers beside metrics.jsonl and TensorBoard: MLflow and Weights & Biases, through Ray's integrations
(`setup_mlflow`, `setup_wandb`) when installed and configured (MLFLOW_TRACKING_URI; WANDB_API_KEY or WANDB_MODE)."""

from __future__ import annotations

import os
from typing import Any


def _in_ray_train() -> bool:
    try:
        import ray.train

        return ray.train.get_context() is not None
    except Exception:  # noqa: BLE001
        return False


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
        if _in_ray_train():
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
        if _in_ray_train():
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
