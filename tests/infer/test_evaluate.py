"""Export (merged checkpoints that match base + adapter), eval against the base model, batch predictions, and what
a run logs besides metrics.jsonl (TensorBoard events, MLflow)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli
from vray.data import synthetic
from vray.data.io import read_samples
from vray.spec import validate_spec
from vray.train.launcher import train_local
from vray.train.prepare import prepare

DATA = "synthetic:vqa?train=32&eval=8"


def _train(tmp_path, name: str, quantized: bool = False, task: str = "vqa", data: str = DATA):
    spec = validate_spec({
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "BFloat16" if quantized else "Float32"}, "quantization": {"enabled": quantized},
        "task": task, "data": {"train": data}, "hyperparameters": {"epochs": 2, "learningRate": 3e-3, "batchSize": 8},
        "evaluation": {"maxNewTokens": 6, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": 1}, "output": str(tmp_path), "name": name,
    })
    return train_local(prepare(spec))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs"), "lora")


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_merged_export_matches_base_plus_adapter(tmp_path, quantized):
    from transformers import AutoModelForImageTextToText

    from vray.infer.engine import ModelEngine
    from vray.infer.export import export_merged
    from vray.infer.target import resolve_target

    run = _train(tmp_path, "q" if quantized else "l", quantized=quantized)
    proc = run_cli("export", str(run.root), "--merge", "--dtype", "Float32", timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip().splitlines()[-1]
    assert folder == str(run.root / "export" / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(folder)  # standalone: no peft, no base needed
    assert not any("lora" in n for n, _ in merged.named_parameters())
    engine = ModelEngine(resolve_target(str(run.root)), device="cpu")  # base (4-bit for QLoRA) + adapter
    for sample in read_samples(str(synthetic.split_paths(DATA)[1])).samples[:4]:
        batch = engine.collator.batch([engine.collator.encode(sample, with_answer=False)], left_pad=True)
        with torch.no_grad():
            a = engine.model.generate(**batch, max_new_tokens=6, do_sample=False)
            b = merged.generate(**batch, max_new_tokens=6, do_sample=False)
            la, lb = engine.model(**batch).logits, merged(**batch).logits
        assert torch.equal(a, b)
        assert torch.allclose(la, lb, atol=1e-2 if quantized else 1e-4)
    with pytest.raises(Exception):
        export_merged(str(run.root), folder)  # an existing export is never overwritten


def test_eval_scores_the_run_next_to_its_base(lora_run):
    proc = run_cli("eval", str(lora_run.root), "--data", DATA, "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["samples"] == 8 and report["primary_metric"] == "exact_match"
    assert set(report["fine_tuned"]) == set(report["base"]) == {"exact_match", "anls"}
    table = run_cli("eval", str(lora_run.root), "--data", DATA, "--no-baseline", timeout=300)
    assert table.returncode == 0 and "exact_match *" in table.stdout and "base" not in table.stdout.split("\n")[1]


def test_predict_writes_one_line_per_sample(lora_run, tmp_path):
    out = tmp_path / "preds.jsonl"
    proc = run_cli("predict", str(lora_run.root), "--data", DATA, "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = read_samples(str(synthetic.split_paths(DATA)[1])).samples
    assert [r["id"] for r in rows] == [s.id for s in expected]
    assert all(r["reference"] == s.answer.text and isinstance(r["prediction"], str) for r, s in zip(rows, expected))


def test_grounding_predictions_carry_boxes_in_image_pixels(tmp_path, monkeypatch):
    import vray.infer.evaluate as evaluate

    run = _train(tmp_path, "ground", task="phrase_grounding", data="synthetic:grounding?train=16&eval=4")
    samples = read_samples(str(synthetic.split_paths("synthetic:grounding?train=16&eval=4")[1])).samples
    # Whatever the model writes in its convention comes back in the request image's pixels (112 x 112 here).
    monkeypatch.setattr(evaluate, "generate_texts", lambda model, tok, batch, settings: (
        [f'[{{"bbox_2d": [0, 0, 56, 56], "label": "{s.answer.boxes[0].label}"}}]' for s in samples][: batch["input_ids"].shape[0]],
        [9] * batch["input_ids"].shape[0]))
    rows = [p.row() for p in evaluate.predict(evaluate.resolve_target(str(run.root)), samples, batch_size=4)]
    assert all(r["boxes"][0]["label"] == s.answer.boxes[0].label for r, s in zip(rows, samples))
    # qwen2.5vl boxes are absolute pixels of the resized image (112 px stays 112): 56 px is half the image.
    assert rows[0]["boxes"][0]["bbox"] == [0.0, 0.0, 56.0, 56.0]


def test_runs_log_tensorboard_events_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store needs no server for a test
    run = _train(tmp_path, "tracked")
    events = list((run.root / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    import mlflow

    mlflow.set_tracking_uri(f"file:{tmp_path / 'mlruns'}")
    (found,) = mlflow.search_runs(experiment_names=["vray"], output_format="list")
    history = mlflow.tracking.MlflowClient().get_metric_history(found.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 9))
