"""The metrics log publishes off the training thread: a slow or failing experiment tracker never holds a step."""

from __future__ import annotations

import json
import threading

from vray.storage.rundir import RunDir
from vray.train import tracking


def test_a_slow_or_failing_tracker_never_holds_the_training_thread(tmp_path, monkeypatch):
    release, logged = threading.Event(), []

    class SlowThenBroken:
        def __init__(self, run_name, config):
            pass

        def log(self, metrics, step):
            release.wait(30)  # a tracker server that takes its time
            if step == 2:
                raise ConnectionError("tracker unreachable")
            logged.append(step)

        def close(self):
            pass

    monkeypatch.setattr(tracking, "Trackers", SlowThenBroken)
    (tmp_path / "run").mkdir()
    log = tracking.MetricsLog(RunDir.of(str(tmp_path / "run")), rank=0)
    for step in range(1, 4):
        log.write({"step": step, "loss": 1.0 / step})  # returns while the tracker still waits
    assert logged == [] and not release.is_set()
    release.set()
    log.close()  # every queued record published before it returns
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines if "loss" in r] == [1, 2, 3]
    assert any(r.get("event") == "warning" and "tracker unreachable" in r["message"] for r in lines)
    assert logged == [1]  # the tracker that failed is dropped; the training goes on without it
    log.close()  # once is enough


def test_rank_0_uploads_a_remote_log_only_from_the_writer_thread(monkeypatch):
    run = RunDir.of("s3://bucket/run")
    uploads: list[tuple[str, str]] = []
    monkeypatch.setattr(RunDir, "exists", lambda self, rel: False)
    monkeypatch.setattr(RunDir, "upload", lambda self, local, rel: uploads.append(
        (threading.current_thread().name, open(local).read())) if rel == "metrics.jsonl" else None)
    monkeypatch.setattr(tracking, "Trackers", lambda *a: tracking._NoTrackers())
    log = tracking.MetricsLog(run, rank=0, upload_every_s=0.0)  # an upload after every record
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0})
        log.flush()  # at a checkpoint: queued too
    log.close()
    assert uploads and {name for name, _ in uploads} == {"vray-metrics"}  # never the training thread
    for _, text in uploads:  # each upload holds whole records
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert len(uploads[-1][1].splitlines()) == 5


def test_a_step_record_of_cpu_values_is_read_at_once():
    import torch

    record = tracking.StepRecord({"step": 1, "loss": torch.tensor(0.25, dtype=torch.float64), "lr": 1e-4})
    assert record.ready_now
    assert record.resolve() == {"step": 1, "loss": 0.25, "lr": 1e-4}
