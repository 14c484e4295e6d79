"""Storage outages (vray.storage.retry): an S3 endpoint (moto on 127.0.0.1, in this process so its objects survive a
restart) that stops during a checkpoint upload. A short outage is waited out and the checkpoint completes, marker
last; one that outlasts the budget stops with one line naming the endpoint and the last complete checkpoint. The
metrics log goes up whole after an outage too."""

from __future__ import annotations

import threading
import time

import pytest

from vray.errors import VrayError
from vray.storage import checkpoint as checkpoint_module
from vray.storage.checkpoint import CheckpointWriter
from vray.storage.rundir import CHECKPOINT_MARKER, RECEIPTS, RunDir
from vray.testing.s3 import local_s3
from vray.train.tracking import MetricsLog

BUCKET = "vray-outage"


@pytest.fixture
def flaky_s3():
    with local_s3(BUCKET) as s3:
        yield s3


@pytest.fixture
def upload_gate(monkeypatch):
    """Uploads wait for `gate`; `failures` counts the attempts that failed (the outage was met)."""
    gate, failures = threading.Event(), []
    real_upload, real_retries = CheckpointWriter._upload, checkpoint_module.with_retries

    def upload(self, staged, rel, marker):
        assert gate.wait(60), "the gate was never opened"
        real_upload(self, staged, rel, marker)

    def with_retries(op, uri, what, budget_s=None):
        def counted():
            try:
                return op()
            except Exception as exc:
                failures.append(exc)
                raise
        return real_retries(counted, uri, what, budget_s)

    monkeypatch.setattr(CheckpointWriter, "_upload", upload)
    monkeypatch.setattr(checkpoint_module, "with_retries", with_retries)
    return gate, failures


def _save(folder):
    for i in range(4):
        (folder / f"shard-{i}.bin").write_bytes(bytes([i]) * 1000)


def test_an_outage_shorter_than_the_budget_is_waited_out_and_the_marker_comes_last(flaky_s3, upload_gate, tmp_path,
                                                                                    monkeypatch):
    gate, failures = upload_gate
    run = RunDir.of(f"s3://{BUCKET}/runs/{tmp_path.name}")
    prefix = f"runs/{tmp_path.name}/checkpoints/step-1"
    objects = {f"{prefix}/shard-{i}.bin" for i in range(4)} | {f"{prefix}/{RECEIPTS}/rank-0.json"}
    seen_at_marker = []
    real_write = RunDir.write_text

    def write_text(self, rel, text):
        if rel.endswith(CHECKPOINT_MARKER):
            seen_at_marker.append(flaky_s3.keys(BUCKET))
        real_write(self, rel, text)

    monkeypatch.setattr(RunDir, "write_text", write_text)
    writer = CheckpointWriter(run)
    writer.write("checkpoints/step-1", _save, {"step": 1, "metrics": {}})  # returns at once: training goes on
    flaky_s3.stop()
    gate.set()
    deadline = time.time() + 30
    while not failures and time.time() < deadline:
        time.sleep(0.05)
    assert failures, "the upload never met the outage"
    time.sleep(1.0)  # a few retries while the endpoint is down
    assert not any(k.endswith(CHECKPOINT_MARKER) for k in flaky_s3.keys(BUCKET))
    flaky_s3.start()
    writer.wait()
    assert [s for s, _ in run.complete_checkpoints()] == [1]
    assert len(seen_at_marker) == 1 and objects <= seen_at_marker[0]
    assert run.read_text("checkpoints/step-1/shard-3.bin") == "\x03" * 1000


def test_an_outage_longer_than_the_budget_names_the_endpoint_and_the_last_checkpoint(flaky_s3, upload_gate, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("VRAY_UPLOAD_RETRY_BUDGET_S", "1")
    gate, _ = upload_gate
    gate.set()
    run = RunDir.of(f"s3://{BUCKET}/runs/{tmp_path.name}")
    writer = CheckpointWriter(run)
    writer.write("checkpoints/step-1", _save, {"step": 1, "metrics": {}})
    writer.wait()
    gate.clear()
    writer.write("checkpoints/step-2", _save, {"step": 2, "metrics": {}})
    flaky_s3.stop()
    gate.set()
    with pytest.raises(VrayError) as raised:
        writer.wait()
    message = str(raised.value)
    assert "\n" not in message
    assert flaky_s3.endpoint in message and f"bucket {BUCKET}" in message
    assert f"the last complete checkpoint is {run.join('checkpoints', 'step-1')}" in message
    assert f"vray train --resume {run.uri}" in message
    assert not any("step-2/" + CHECKPOINT_MARKER in k for k in flaky_s3.keys(BUCKET))


def test_the_metrics_log_goes_up_whole_after_an_outage(flaky_s3, tmp_path):
    run = RunDir.of(f"s3://{BUCKET}/runs/{tmp_path.name}")
    log = MetricsLog(run, rank=0, upload_every_s=0.0)
    log.write({"step": 1, "loss": 1.0})
    log.drain()
    flaky_s3.stop()
    for step in (2, 3):
        log.write({"step": step, "loss": 1.0 / step})  # the training thread goes on while the upload waits
    log.flush()
    time.sleep(1.0)
    flaky_s3.start()
    log.close()
    assert [r["step"] for r in run.read_metrics() if "step" in r] == [1, 2, 3]


def test_a_metrics_upload_past_the_budget_stops_with_the_endpoint_and_the_resume_command(flaky_s3, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("VRAY_UPLOAD_RETRY_BUDGET_S", "1")
    run = RunDir.of(f"s3://{BUCKET}/runs/{tmp_path.name}")
    log = MetricsLog(run, rank=0, upload_every_s=0.0)
    log.last_checkpoint = lambda: run.join("checkpoints", "step-4")
    log.write({"step": 1, "loss": 1.0})
    log.drain()
    flaky_s3.stop()
    log.write({"step": 2, "loss": 0.5})
    with pytest.raises(VrayError) as raised:
        log.drain()
    message = str(raised.value)
    assert "\n" not in message and flaky_s3.endpoint in message and "metrics.jsonl" in message
    assert f"the last complete checkpoint is {run.join('checkpoints', 'step-4')}" in message
    assert f"vray train --resume {run.uri}" in message
    flaky_s3.start()
    log.close()
    assert [r["step"] for r in run.read_metrics() if "step" in r] == [1, 2]  # closed with the store back: whole


def test_checkpoint_bookkeeping_waits_out_an_outage_on_the_uploader_thread(flaky_s3, tmp_path, monkeypatch):
    """`best` and retention run after the checkpoint is complete, on the uploader thread: while the endpoint is away,
    handing over the next checkpoint and its bookkeeping returns at once (the training steps go on), and both are
    done once it is back. What an interrupted attempt left uploading goes before this attempt's first checkpoint."""
    run = RunDir.of(f"s3://{BUCKET}/runs/{tmp_path.name}")
    run.write_text("checkpoints/step-6/shard-0.bin", "an interrupted attempt's upload")  # no marker
    run.write_text("final/model.bin", "an interrupted attempt's final")
    writer = CheckpointWriter(run)
    writer.write("checkpoints/step-2", _save, {"step": 2, "metrics": {"eval/exact_match": 0.5}})
    prefix = f"runs/{tmp_path.name}"
    assert not any(k.startswith((f"{prefix}/checkpoints/step-6/", f"{prefix}/final/")) for k in flaky_s3.keys(BUCKET))
    writer.then(lambda: run.point_best_at("checkpoints/step-2"))
    writer.wait()

    monkeypatch.setenv("VRAY_UPLOAD_RETRY_BUDGET_S", "30")  # a call that waited for the endpoint here fails
    flaky_s3.stop()
    # Both return with the endpoint still away (it comes back only below): nothing on this thread waits for it.
    writer.write("checkpoints/step-4", _save, {"step": 4, "metrics": {"eval/exact_match": 0.1}})
    writer.then(lambda: writer.retain("eval/exact_match", 1))
    time.sleep(1.5)  # retries meanwhile
    assert not any(k.endswith(f"step-4/{CHECKPOINT_MARKER}") for k in flaky_s3.keys(BUCKET))
    flaky_s3.start()
    writer.wait()
    assert [s for s, _ in run.complete_checkpoints()] == [2, 4]  # the latest, and the best `best` points at
    assert str(run.best_checkpoint()).endswith("checkpoints/step-2")
