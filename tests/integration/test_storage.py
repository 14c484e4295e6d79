"""Run directories on S3 (a moto server on 127.0.0.1): checkpoints complete or invisible, best, metrics, serving."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from vray.spec import validate_spec
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir
from vray.train.launcher import run_training
from vray.train.prepare import prepare

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_a_ray_run_writes_its_run_directory_to_s3(ray_head, s3_endpoint):
    import fsspec

    spec = validate_spec({
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "BFloat16"}, "task": "vqa", "data": {"train": "synthetic:vqa?train=16&eval=4"},
        "hyperparameters": {"epochs": 2, "learningRate": 3e-3, "batchSize": 8}, "lora": {"dropout": 0.0},
        "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
        "checkpointing": {"everySteps": 1, "keepBest": 1},
        "cluster": {"workers": 2, "strategy": "zero2"}, "output": "s3://vray-test/runs", "name": "on-s3",
    })
    prepared = prepare(spec)
    run = run_training(prepared, Console(file=io.StringIO()))
    assert run.uri == "s3://vray-test/runs/on-s3"
    fs = fsspec.filesystem("s3")
    assert fs.exists("vray-test/runs/on-s3/spec.yaml") and fs.exists("vray-test/runs/on-s3/curves.png")
    steps = [s for s, _ in run.complete_checkpoints()]
    assert steps[-1] == 4 and len(steps) <= 2  # the latest and the best one are kept
    assert fs.exists(f"vray-test/runs/on-s3/checkpoints/step-4/{CHECKPOINT_MARKER}")
    assert fs.exists("vray-test/runs/on-s3/checkpoints/step-4/deepspeed")  # every rank's shards uploaded
    best = json.loads(fs.cat("vray-test/runs/on-s3/best"))
    assert best["checkpoint"].startswith("checkpoints/step-")
    records = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert fs.exists(f"vray-test/runs/on-s3/final/{CHECKPOINT_MARKER}")

    # A checkpoint without its marker is incomplete: never listed, never served.
    fs.pipe("vray-test/runs/on-s3/checkpoints/step-99/adapter_model.safetensors", b"partial")
    assert [s for s, _ in RunDir.of(run.uri).complete_checkpoints()] == steps

    from vray.infer.engine import ModelEngine
    from vray.infer.target import resolve_target

    target = resolve_target(run.uri)
    assert target.checkpoint.startswith("best") and target.adapter and "://" not in target.adapter
    sample = json.loads(open(prepared.eval_path).readline())
    import base64
    from pathlib import Path

    image = "data:image/png;base64," + base64.b64encode(Path(prepared.eval_path).parent.joinpath(sample["images"][0]).read_bytes()).decode()
    result = ModelEngine(target, device="cpu").chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": sample["conversation"][0]["text"]}]}])
    assert result.completion_tokens >= 1


def test_training_goes_on_while_a_checkpoint_uploads(s3_endpoint, monkeypatch):
    """Each checkpoint's upload is held until the step after it has been logged: a training loop that waited for
    an upload would never log that step. The run still ends with every checkpoint complete."""
    import threading

    from vray.storage.checkpoint import CheckpointWriter
    from vray.train.launcher import train_local
    from vray.train.tracking import MetricsLog

    logged: list[int] = []
    more = threading.Condition()
    real_write, real_upload = MetricsLog.write, CheckpointWriter._upload

    def write(self, record):
        real_write(self, record)
        if "loss" in record:
            with more:
                logged.append(record["step"])
                more.notify_all()

    held: list[tuple[int, int]] = []  # (checkpoint step, the last step logged when its upload went ahead)

    def upload(self, staged, rel, marker):
        if rel.startswith("checkpoints/step-"):
            step = int(rel.rsplit("-", 1)[1])
            if step < 4:
                with more:
                    assert more.wait_for(lambda: max(logged, default=0) > step, timeout=300), \
                        f"step {step + 1} was not logged while step {step} uploaded"
            held.append((step, max(logged)))
        real_upload(self, staged, rel, marker)

    monkeypatch.setattr(MetricsLog, "write", write)
    monkeypatch.setattr(CheckpointWriter, "_upload", upload)
    spec = validate_spec({
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "BFloat16"}, "task": "vqa", "data": {"train": "synthetic:vqa?train=16&eval=2"},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 4},
        "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
        "checkpointing": {"everySteps": 1, "keepBest": 10},
        "cluster": {"workers": 1, "strategy": "ddp"}, "output": "s3://vray-test/runs", "name": "uploads-behind",
    })
    run = train_local(prepare(spec))
    assert [s for s, _ in held] == [1, 2, 3, 4] and all(last > step for step, last in held[:3])
    assert [s for s, _ in RunDir.of(run.uri).complete_checkpoints()] == [1, 2, 3, 4]
    assert run.exists(f"final/{CHECKPOINT_MARKER}") and run.exists("final/adapter_model.safetensors")
