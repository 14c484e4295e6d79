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
