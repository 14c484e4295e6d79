"""The checkpoint protocol (storage/checkpoint.py) and the run record (storage/record.py), on a local folder and
on S3 (moto on 127.0.0.1): a checkpoint is visible only with its marker, retention keeps the latest, the best N
and what `best` points at, uploads run in the background with the marker last, a resuming rank fetches only
its own per-rank files, and a run directory reads back as typed values."""

from __future__ import annotations

import json
import threading

import pytest

from vray.errors import VrayError
from vray.plan.planner import cpu_plan
from vray.spec import validate_spec
from vray.storage.checkpoint import CheckpointWriter
from vray.storage.record import RunRecord
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir, fetch_checkpoint


def _save(text: str):
    def save(folder):
        (folder / "weights.bin").write_text(text)
    return save


def _write_run(run: RunDir, scores: dict[int, float], keep_best: int = 1) -> CheckpointWriter:
    writer = CheckpointWriter(run)
    for step, score in scores.items():
        writer.write(f"checkpoints/step-{step}", _save(f"step {step}"),
                     {"step": step, "metrics": {"eval/exact_match": score}})
        writer.wait()
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


@pytest.fixture
def gated_uploads(monkeypatch):
    """Uploads of the ranks named in the returned dict wait until its event is set."""
    gates: dict[int, threading.Event] = {}
    real = CheckpointWriter._upload

    def upload(self, staged, rel, marker):
        gate = gates.get(self.rank)
        if gate is not None:
            assert gate.wait(60), "the gate was never opened"
        real(self, staged, rel, marker)

    monkeypatch.setattr(CheckpointWriter, "_upload", upload)
    return gates


def test_uploads_run_in_the_background_and_the_marker_comes_after_every_rank(s3_endpoint, tmp_path, gated_uploads):
    run = RunDir.of(f"s3://vray-test/units/{tmp_path.name}")
    step_1 = threading.Barrier(2)
    writers = [CheckpointWriter(run, rank, step_1.wait, world=2) for rank in (0, 1)]
    gated_uploads[1] = threading.Event()

    def write(writer):
        def save(folder):
            (folder / f"shard-{writer.rank}.bin").write_text(f"rank {writer.rank}")
        writer.write("checkpoints/step-1", save, {"step": 1, "metrics": {}})

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "write() waited for an upload"
    # Rank 1 is still uploading: rank 0's part is there, the checkpoint is not visible, retention cannot touch it.
    waiting = threading.Thread(target=writers[0].wait)
    waiting.start()
    waiting.join(2)
    assert waiting.is_alive(), "rank 0 published before rank 1's upload finished"
    assert run.complete_checkpoints() == [] and not run.exists(f"checkpoints/step-1/{CHECKPOINT_MARKER}")
    writers[0].retain("eval/exact_match", 1)
    gated_uploads[1].set()
    writers[1].wait()
    waiting.join(30)
    assert [s for s, _ in run.complete_checkpoints()] == [1]
    assert run.read_text("checkpoints/step-1/shard-0.bin") == "rank 0"
    assert run.read_text("checkpoints/step-1/shard-1.bin") == "rank 1"


def test_a_resuming_rank_fetches_the_shared_files_and_its_own(s3_endpoint, tmp_path):
    run = RunDir.of(f"s3://vray-test/units/{tmp_path.name}")
    names = ["training_state.pt", "rng-rank0.pt", "rng-rank1.pt", "deepspeed/state/mp_rank_00_model_states.pt",
             "deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "dcp/__0_0.distcp", "dcp/__1_0.distcp"]

    def save(folder):
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(name)

    writer = CheckpointWriter(run)
    uri = writer.write("checkpoints/step-1", save, {"step": 1, "metrics": {}})
    writer.wait()
    local = fetch_checkpoint(uri, cache=tmp_path / "cache", rank=1)
    have = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and not p.name.startswith(".f"))
    assert "rng-rank0.pt" not in have and "deepspeed/state/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt" not in have
    assert {"rng-rank1.pt", "training_state.pt", "dcp/__0_0.distcp", CHECKPOINT_MARKER,
            "deepspeed/state/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(have)
    # Rank 0 on the same node completes the same copy; a reader that wants it all gets it all.
    assert (fetch_checkpoint(uri, cache=tmp_path / "cache", rank=0) / "rng-rank0.pt").read_text() == "rng-rank0.pt"
    whole = fetch_checkpoint(uri, cache=tmp_path / "cache")
    assert all((whole / name).exists() for name in names)
