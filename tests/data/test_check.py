"""`vray data check` and training's refusal of bad data (or --skip-invalid, which reports every skipped row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli
from vray.archs import registry
from vray.data.check import check_dataset
from vray.errors import DataError
from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint
from vray.spec import validate_spec


def _row(id_, images, answer, task="vqa", user="<image>What colour?", boxes=None):
    turn = {"role": "assistant", "text": answer}
    if boxes:
        turn["boxes"] = boxes
    return {"id": id_, "task": task, "images": images, "conversation": [{"role": "user", "text": user}, turn]}


@pytest.fixture
def messy(tmp_path) -> Path:
    Image.new("RGB", (100, 80), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a png")
    Image.new("RGB", (10, 10)).save(tmp_path / "pic.pcx", format="PCX")
    rows = [
        _row("good", ["ok.png"], "red"),
        _row("missing", ["nope.png"], "red"),
        _row("corrupt", ["corrupt.png"], "red"),
        _row("pcx", ["pic.pcx"], "red"),
        _row("outside", ["ok.png"], "", task="phrase_grounding", user="<image>Locate it.",
             boxes=[{"label": "it", "bbox": [10, 10, 150, 50], "image": 0}]),
        _row("empty", ["ok.png"], ""),
        _row("degenerate", ["ok.png"], "", task="phrase_grounding", boxes=[{"label": "x", "bbox": [30, 30, 30, 40]}]),
        _row("good", ["ok.png"], "blue"),
        _row("long", ["ok.png"], " ".join(["red"] * 300)),
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{broken json")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_problem_is_reported_with_its_row(messy):
    arch = registry.get("qwen2.5vl", "3B")
    processor = load_processor(tiny_checkpoint("qwen2_5_vl"))
    report = check_dataset(str(messy), arch, processor, max_tokens=200)
    by_id = {i.sample_id: i for i in report.errors if i.sample_id}
    kinds = {(i.where.rsplit(":", 1)[-1], i.kind) for i in report.errors}
    assert ("2", "missing image") in kinds and "nope.png" in by_id["missing"].message
    assert ("3", "unreadable image") in kinds and "corrupt" in by_id["corrupt"].message
    assert ("4", "invalid JSON") in kinds
    assert ("5", "unsupported format") in kinds and "PCX" in by_id["pcx"].message
    assert ("6", "box outside the image") in kinds and "100x80" in by_id["outside"].message
    assert ("7", "schema") in kinds and any("empty answer" in i.message for i in report.errors)
    assert ("8", "schema") in kinds and any("degenerate" in i.message for i in report.errors)
    assert ("9", "duplicate id") in kinds
    assert ("10", "over token budget") in kinds and "budget of 200" in by_id["long"].message
    assert report.rows == 10 and report.summary()["valid_rows"] == 1
    assert report.token_counts == "processor" and report.tokens  # the good row was measured


def test_token_counts_are_estimated_without_a_processor(messy):
    report = check_dataset(str(messy), registry.get("qwen2.5vl", "3B"), None, max_tokens=200)
    assert report.token_counts == "estimated"
    assert any(i.kind == "over token budget" and i.sample_id == "long" for i in report.errors)


def test_cli_check_exits_1_on_errors_and_0_when_clean(messy, tmp_path):
    proc = run_cli("data", "check", str(messy), "--arch", "qwen2.5vl:3B", "--model", "tiny:qwen2_5_vl",
                   "--max-tokens", "200", "--json", timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["errors"] >= 9 and report["valid_rows"] == 1 and len(report["issues"]) >= 9
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(_row("a", [str(tmp_path / "ok.png")], "red")) + "\n")
    ok = run_cli("data", "check", str(clean), "--arch", "qwen2.5vl", "--model", "tiny:qwen2_5_vl", timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 row(s)" in ok.stdout and "1 valid" in ok.stdout


def _spec(tmp_path, train: Path) -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "compute": {"precisionType": "Float32"}, "task": "vqa", "data": {"train": str(train)},
            "hyperparameters": {"epochs": 1, "batchSize": 2}, "evaluation": {"maxNewTokens": 2, "temperature": 0},
            "cluster": {"workers": 1}, "output": str(tmp_path / "runs"), "name": "skip"}


def test_training_refuses_bad_rows_unless_skipping_them(messy, tmp_path):
    from vray.train.launcher import train_local
    from vray.train.prepare import prepare

    with pytest.raises(DataError) as exc:
        prepare(validate_spec(_spec(tmp_path, messy)))
    assert "--skip-invalid" in str(exc.value) and "nope.png" in str(exc.value)
    assert not (tmp_path / "runs").exists()

    prepared = prepare(validate_spec({**_spec(tmp_path, messy), "data": {"train": str(messy), "maxTokens": 200}}),
                       skip_invalid=True)
    assert prepared.data.skipped_rows == 9
    run = train_local(prepared)
    report = json.loads((run.root / "data_check.json").read_text())
    assert report["skipped_rows"] == 9
    listed = {i["where"].rsplit(":", 1)[-1] for d in report["datasets"] for i in d["issues"] if i["severity"] == "error"}
    assert listed == {str(n) for n in range(2, 11)}  # every skipped row, by its line
    start = next(r for r in run.read_metrics() if r.get("event") == "start")
    assert start["total_steps"] == 1  # one valid sample, batch 2: one step
