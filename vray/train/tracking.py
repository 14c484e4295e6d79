"""What a run logs: metrics.jsonl (rank 0 writes it; the driver renders progress from it), TensorBoard events, and
experiment trackers: MLflow and Weights & Biases, through Ray's integrations (`setup_mlflow`, `setup_wandb`) when
installed and configured (MLFLOW_TRACKING_URI; WANDB_API_KEY or WANDB_MODE)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vray.cluster import in_ray_train_worker
from vray.errors import VrayError, seconds_from_env
from vray.storage.checkpoint import outage_message
from vray.storage.retry import StorageOutage
from vray.storage.rundir import RunDir


class Trackers:
    """Logs numeric metrics to every configured tracker (rank 0 only)."""

    def __init__(self, run_name: str, config: dict[str, Any]):
        self._mlflow: Any = None
        self._mlflow_run: str | None = None  # MLflow's active run is per thread: metrics name the run they go to
        self._wandb: Any = None
        if os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                self._mlflow = self._open_mlflow(run_name, config)
                active = self._mlflow.active_run()
                self._mlflow_run = active.info.run_id if active is not None else None
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
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step,
                                     run_id=self._mlflow_run)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        """End the runs (on the thread that opened them)."""
        if self._mlflow is not None and hasattr(self._mlflow, "end_run"):
            self._mlflow.end_run()
        if self._wandb is not None and hasattr(self._wandb, "finish"):
            self._wandb.finish()


def _warning(message: str) -> dict[str, Any]:
    return {"time": time.time(), "event": "warning", "message": message}


class _NoTrackers:
    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


METRICS_UPLOAD_EVERY_S = 5.0  # how often metrics.jsonl goes up to a remote run directory (and at every checkpoint)


def metrics_upload_every_s() -> float:
    """`VRAY_METRICS_UPLOAD_S`, else METRICS_UPLOAD_EVERY_S: fresher progress for more PUTs, or the other way round."""
    return seconds_from_env("VRAY_METRICS_UPLOAD_S", METRICS_UPLOAD_EVERY_S)


class MetricsLog:
    """metrics.jsonl, written by rank 0 (the driver renders progress from it): appended locally; on a remote run
    directory written to a local file and uploaded whole every few seconds and at checkpoints.

    `write` appends the record to the local file (so the log always holds every step up to the latest checkpoint)
    and queues the rest: one writer thread feeds TensorBoard and the trackers (MLflow / W&B calls go over the
    network) and uploads, so the other ranks never wait at their next collective for rank 0's I/O. `close` drains
    the queue. A tracker that fails is dropped with a warning line; the training goes on."""

    def __init__(self, run: RunDir, rank: int, upload_every_s: float | None = None):
        self.run = run
        self.rank = rank
        self.upload_every_s = metrics_upload_every_s() if upload_every_s is None else upload_every_s
        self._last_upload = 0.0
        self.path = run.metrics if run.local else Path(tempfile.mkdtemp(prefix="vray-metrics-")) / "metrics.jsonl"
        if not run.local and rank == 0 and run.exists("metrics.jsonl"):  # a resumed run continues its log
            self.path.write_text(run.read_text("metrics.jsonl"))
        self._tb: Any = None
        self._trackers: Any = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._file_lock = threading.Lock()  # the training thread's records and the writer's warnings
        self.last_checkpoint: Callable[[], str | None] = lambda: None  # for the message of a storage outage

    # ---- the training thread ---------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        """Append one record and queue it for TensorBoard, the trackers and the upload (rank 0; other ranks write
        nothing)."""
        if self.rank != 0:
            return
        self._raise()
        if self._trackers is None and record.get("step") is not None:
            try:  # once, on this thread: Ray's integrations read the worker's context
                self._trackers = Trackers(self.run.name, {"run": self.run.uri})
            except Exception as exc:  # noqa: BLE001 - an unreachable tracker server must not stop the training
                self._trackers = _NoTrackers()
                self._append(_warning(f"experiment tracking is off: {type(exc).__name__}: {exc}"))
        record = {"time": time.time(), **record}
        self._append(record)
        self._submit("record", record)

    def flush(self) -> None:
        """Upload the log (and TensorBoard events) of a remote run directory, on the writer thread."""
        if self.rank != 0:
            return
        self._submit("flush", None)

    def drain(self) -> None:
        """Wait until every queued record is published."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        """Publish what is queued, upload, and close TensorBoard and the trackers (once)."""
        if self.rank != 0 or self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(("close", None))
            self._thread.join()
            self._thread = None
        else:
            self._flush()
        if self._tb:
            self._tb.close()
        if self._trackers is not None:
            self._trackers.close()
        self._raise()

    def _submit(self, kind: str, item: Any) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vray-metrics", daemon=True)
            self._thread.start()
        self._queue.put((kind, item))

    def _raise(self) -> None:
        if self._error is not None:  # TensorBoard or an upload failed (a full disk, storage refused): stop here
            error, self._error = self._error, None
            if isinstance(error, StorageOutage):  # uploads retried past the budget: one line, and how to go on
                raise VrayError(outage_message(self.run, error, "metrics upload", self.last_checkpoint())) from error
            raise error

    # ---- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, item = self._queue.get()
            try:
                if kind == "record":
                    self._publish(item)
                else:  # flush, or close
                    self._flush()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread at its next write
                self._error = exc
            finally:
                self._queue.task_done()
            if kind == "close":  # even when its last upload failed: `close` waits for this thread
                return

    def _append(self, record: dict[str, Any]) -> None:
        with self._file_lock, open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _publish(self, record: dict[str, Any]) -> None:
        self._tensorboard(record)
        if record.get("step") is not None:
            self._track(record)
        if not self.run.local and time.time() - self._last_upload > self.upload_every_s:
            self._flush()

    def _track(self, record: dict[str, Any]) -> None:
        try:
            numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k not in ("time", "step")}
            self._trackers.log(numeric, int(record["step"]))
        except Exception as exc:  # noqa: BLE001 - a tracker server that is down must not stop the training
            self._trackers = _NoTrackers()
            self._append(_warning(f"experiment tracking stopped: {type(exc).__name__}: {exc}"))

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

    def _flush(self) -> None:
        if self._tb:
            self._tb.flush()
        if not self.run.local:
            # A snapshot of whole lines: the training thread appends to the log while the upload reads it.
            snapshot = self.path.with_name("metrics.upload.jsonl")
            with self._file_lock:
                shutil.copyfile(self.path, snapshot)
            self.run.upload(snapshot, "metrics.jsonl")
            events = self.path.parent / "tensorboard"
            for file in events.glob("*") if events.exists() else []:
                self.run.upload(file, f"tensorboard/{file.name}")
            self._last_upload = time.time()

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after `step` (a restart replays them: each step stays logged once); return how
        many steps' training records were dropped (rank 0; 0 elsewhere)."""
        if self.rank != 0:
            return 0
        self.drain()  # no upload reads the file while it is rewritten
        if not self.path.exists():
            return 0
        kept, dropped = [], set()
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") is None or rec["step"] <= step:
                kept.append(line)
            elif "loss" in rec:
                dropped.add(rec["step"])
        self.path.write_text("".join(k + "\n" for k in kept))
        return len(dropped)


class StepRecord:
    """One step's metrics record whose values may still be tensors on a GPU (the loss). They are copied to pinned
    host memory without waiting, and `resolve` reads them one step later, when the next step is queued and the copy
    is long done: the training thread never waits for the GPU to drain. Values on the CPU are read at once."""

    def __init__(self, record: dict[str, Any]):
        import torch

        self.record = record
        self._host: dict[str, Any] = {}
        self._event: Any = None
        for key, value in record.items():
            if isinstance(value, torch.Tensor):
                if value.device.type == "cuda":
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    host.copy_(value.detach(), non_blocking=True)
                    self._host[key] = host
                    self._event = self._event or torch.cuda.Event()
                else:
                    self._host[key] = value.detach()
        if self._event is not None:
            self._event.record()

    @property
    def ready_now(self) -> bool:
        """Whether nothing waits on a GPU copy (a CPU run): the record can be written at its own step."""
        return self._event is None

    def resolve(self) -> dict[str, Any]:
        """The record with plain numbers (waits for this step's copies only, not for later work)."""
        if self._event is not None:
            self._event.synchronize()
        return {**self.record, **{k: float(v) for k, v in self._host.items()}}
