"""The checkpoint protocol (storage/checkpoint.py) and the run record (storage/record.py), on a local folder and
on S3 (moto on 127.0.0.1): a checkpoint is visible only with its marker, retention keeps the latest, the best N
and what `best` points at, and a run directory reads back as typed values."""

from __future__ import annotations

import json

import pytest

from vray.errors import VrayError
from vray.plan.planner import cpu_plan
from vray.spec import validate_spec
from vray.storage.checkpoint import CheckpointWriter
from vray.storage.record import RunRecord
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir


def _save(text: str):
    def save(folder):
        (folder / "weights.bin").write_text(text)
    return save


def _write_run(run: RunDir, scores: dict[int, float], keep_best: int = 1) -> CheckpointWriter:
    writer = CheckpointWriter(run)
    for step, score in scores.items():
        writer.write(f"checkpoints/step-{step}", _save(f"step {step}"),
                     {"step": step, "metrics": {"eval/exact_match": score}})
        best = max((s for s in scores if s <= step), key=lambda s: scores[s])
        run.point_best_at(f"checkpoints/step-{best}")
        writer.retain("eval/exact_match", keep_best)
    return writer


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoints_are_complete_or_invisible_and_retention_keeps_latest_and_best(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
        run = RunDir.of(f"s3://vray-test/units/{tmp_path.name}")
    else:
        run = RunDir.of(tmp_path / "run")
        run.checkpoints.mkdir(parents=True)
    _write_run(run, {1: 0.2, 2: 0.9, 3: 0.1, 4: 0.3})
    # step 2 is the best; step 4 the latest; 1 and 3 are gone
    assert [s for s, _ in run.complete_checkpoints()] == [2, 4]
    assert str(run.best_checkpoint()).endswith("checkpoints/step-2")
    assert json.loads(run.read_text(f"checkpoints/step-4/{CHECKPOINT_MARKER}"))["step"] == 4
    assert run.read_text("checkpoints/step-4/weights.bin") == "step 4"

    # A folder without its marker (a writer that died before publishing) is never listed.
    if run.local:
        (run.checkpoints / "step-9").mkdir()
        (run.checkpoints / "step-9" / "weights.bin").write_text("partial")
    else:
        run.write_text("checkpoints/step-9/weights.bin", "partial")
    assert [s for s, _ in run.complete_checkpoints()] == [2, 4]


def test_a_failed_save_publishes_nothing(tmp_path):
    run = RunDir.of(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)

    def broken(folder):
        (folder / "weights.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        CheckpointWriter(run).write("checkpoints/step-1", broken, {"step": 1, "metrics": {}})
    assert run.complete_checkpoints() == [] and not (run.checkpoints / "step-1").exists()


def test_a_run_directory_reads_back_as_one_record(tmp_path):
    spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "3B"}, "task": "vqa", "name": "rec",
                          "output": str(tmp_path)}).resolved()
    plan = cpu_plan(spec)
    run = RunDir.of(spec.run_dir)
    run.checkpoints.mkdir(parents=True)
    run.write_text("spec.yaml", spec.to_yaml())
    run.write_text("plan.json", plan.to_json())
    writer = _write_run(run, {1: 0.5, 2: 0.4}, keep_best=2)
    writer.write("final", _save("final"), {"step": 2, "metrics": {}})

    record = RunRecord.read(run.uri)
    assert record.spec == spec and record.plan == plan
    assert [s for s, _ in record.checkpoints] == [1, 2] and record.latest.endswith("step-2")
    assert record.best.endswith("checkpoints/step-1") and record.final.endswith("final")

    with pytest.raises(VrayError, match="no spec.yaml"):
        RunRecord.read(tmp_path / "not-a-run")
