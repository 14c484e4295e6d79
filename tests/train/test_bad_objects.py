"""Bad objects mid-run: an image that no longer decodes after the data check never crashes a worker.

Two runs of `tiny:qwen2_5_vl` LoRA on two gloo ranks (one process group serves both) read the same dataset, whose
first-trained image is overwritten with garbage after `prepare()` (after the data check) and before the workers
read it. With --skip-invalid the sample trains as the vision dummy (no loss, zero gradient), the ranks keep in
lockstep, the run finishes at its planned final step and data_report.json names the skipped row; a held-out image
broken the same way is left out of each evaluation and reported too. Without it, the run stops at the next
checkpoint, written complete, with an error naming the sample, its file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from vray.data import synthetic
from vray.data.pipeline import DataOrder
from vray.spec import validate_spec
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir
from vray.train.local import run_workers
from vray.train.loop import DATA_REPORT
from vray.train.prepare import prepare, worker_config, write_run_files


def _spec(data: Path, out: Path, name: str, held_out: Path | None = None) -> dict:
    return {
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "Float32"}, "task": "vqa",
        "data": {"train": str(data), **({"eval": str(held_out)} if held_out else {})},
        "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 4},
        "cluster": {"workers": 2}, "output": str(out), "name": name,
        "checkpointing": {"everySteps": 2, "keepBest": 5},
    }


def test_an_image_broken_after_the_check_is_skipped_or_stops_the_run_at_a_checkpoint(tmp_path):
    folder = synthetic.materialize("synthetic:vqa?train=16&eval=2", root=tmp_path / "cache")  # this test's own copy
    train = folder / "train.jsonl"
    held_out = synthetic.materialize("synthetic:vqa?train=2&eval=2", root=tmp_path / "held-out") / "eval.jsonl"
    skip = prepare(validate_spec(_spec(train, tmp_path / "runs", "skip", held_out)), skip_invalid=True)
    stop = prepare(validate_spec(_spec(train, tmp_path / "runs", "stop")))
    kept = skip.data.samples[str(train)]
    assert skip.plan.num_workers == 2 and skip.plan.effective_batch == 4 and len(kept) == 16

    # The first sample of the first step, on whichever rank takes it: broken after the check.
    order = DataOrder(len(kept), skip.plan.effective_batch, skip.plan.micro_batch, skip.spec.seed)
    bad = kept[order.epoch_order(0)[0]]
    Path(bad.images[0]).write_bytes(b"not an image any more")
    broken = skip.data.samples[str(held_out)][0]  # the --skip-invalid run's held-out data only
    Path(broken.images[0]).write_bytes(b"not an image any more")

    configs = []
    for prepared in (skip, stop):
        write_run_files(prepared)
        configs.append(worker_config(prepared, rows_in=tmp_path / f"rows-{prepared.spec.name}"))
    ok, stopped = run_workers(configs, 2, keep_going=True, timeout_s=300)

    # --skip-invalid: the run finishes every step; the report counts the row once and names it.
    assert ok.ok, ok.report()
    run = skip.run
    metrics = run.read_metrics()
    assert max(r["step"] for r in metrics if "loss" in r) == 4  # 16 samples / 4 a step, one epoch: as planned
    assert [s for s, _ in run.complete_checkpoints()] == [2, 4] and (run.final / "adapter_config.json").exists()
    report = json.loads((run.root / DATA_REPORT).read_text())
    # the training row once (step 1); the held-out row at each evaluation (before training, at steps 2 and 4)
    assert report["skipped_rows"] == 2 and report["skips"] == 4 and report["through_step"] == 4
    [held, row] = report["rows"]
    assert row["id"] == bad.id and row["split"] == "train" and row["file"] == bad.images[0] and row["steps"] == [1]
    assert "cannot be read" in row["error"] and bad.id in row["error"]
    assert held["id"] == broken.id and held["split"] == "eval" and held["file"] == broken.images[0]
    assert held["steps"] == [0, 2, 4]
    events = [r for r in metrics if r.get("event") == "skipped_samples"]
    assert [e["step"] for e in events] == [2, 4]
    assert [(s["split"], s["id"], s["step"]) for s in events[0]["samples"]] == [
        ("eval", broken.id, 0), ("train", bad.id, 1), ("eval", broken.id, 2)]
    # every evaluation scored the one held-out sample that still decodes, and no worker crashed on the other
    evaluations = [r for r in metrics if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4] and all(r["eval/samples"] == 1 for r in evaluations)

    # Without it: the run stops at the next checkpoint (step 2, complete), naming the sample, the file and the fix.
    assert not stopped.ok
    text = stopped.report()
    assert f"sample '{bad.id}'" in text and bad.images[0] in text and "step-2" in text
    assert "--skip-invalid" in text and "--resume" in text
    run = RunDir.of(stop.run.uri)
    assert [s for s, _ in run.complete_checkpoints()] == [2]
    [(_, checkpoint)] = run.complete_checkpoints()
    assert (checkpoint / CHECKPOINT_MARKER).exists() and (checkpoint / "adapter_model.safetensors").exists()
    assert (checkpoint / "training_state.pt").exists() and not run.final.exists()
    assert max(r["step"] for r in run.read_metrics() if "loss" in r) == 2
    assert json.loads((run.root / DATA_REPORT).read_text())["rows"][0]["id"] == bad.id


def test_a_deleted_image_stands_in_as_the_vision_dummy_naming_its_file(tmp_path):
    from vray.data.collate import IGNORE_INDEX
    from vray.data.io import read_jsonl
    from vray.data.pipeline import encode_or_stand_in
    from vray.train.loop import CollatorFactory

    folder = synthetic.materialize("synthetic:vqa?train=2&eval=1", root=tmp_path / "cache")
    spec = validate_spec(_spec(folder / "train.jsonl", tmp_path / "runs", "unit")).resolved()
    collator = CollatorFactory.of(spec)()
    good, gone = read_jsonl(str(folder / "train.jsonl"))
    Path(gone.images[0]).unlink()
    assert encode_or_stand_in(collator, good).skipped is None
    stand_in = encode_or_stand_in(collator, gone)
    skipped = dict(stand_in.skipped)
    error = skipped.pop("error")
    assert skipped == {"id": gone.id, "file": gone.images[0], "kind": "missing image"}
    # the error names the sample and says what is wrong (a long path is shortened in the message; `file` has it whole)
    assert error.startswith(f"sample '{gone.id}': image '") and error.endswith("' is missing")
    assert stand_in.has_visual and bool((stand_in.tensors["labels"] == IGNORE_INDEX).all())  # no loss, no gradient
    assert stand_in.length == collator.vision_dummy().length
