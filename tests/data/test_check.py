"""`vray data check` and training's refusal of bad data (or --skip-invalid, which reports every skipped row)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from tests.conftest import run_cli
from vray.archs import registry
from vray.cluster import connect
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

    # A second run on the same file and settings reads the check's report from the cache, and says so.
    from vray.train.prepare import check_data

    text = io.StringIO()
    again = check_data(prepared.spec, prepared.train_path, None, True, Console(file=text, width=400))
    assert "report is cached" in text.getvalue() and again.reports[0].cached
    assert again.skipped_rows == 9 and [s.id for s in again.samples[prepared.train_path]] == ["good"]
    assert again.reports[0].issues == prepared.data.reports[0].issues


def _mixed(tmp_path: Path, copies: int) -> Path:
    """Good rows, rows with a missing or a corrupt image, an over-budget row and a broken line, `copies` times."""
    Image.new("RGB", (100, 80), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not the rest of a png")
    lines = []
    for k in range(copies):
        lines += [json.dumps(_row(f"good{k}", ["ok.png"], "red")), json.dumps(_row(f"missing{k}", ["nope.png"], "red")),
                  "{broken json", json.dumps(_row(f"corrupt{k}", ["corrupt.png"], "red")),
                  json.dumps(_row(f"long{k}", ["ok.png"], " ".join(["red"] * 300)))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_ray_tasks_report_what_the_check_in_this_process_reports(tmp_path, ray_head):
    import ray

    from vray.data.check import shown_progress

    if not ray.is_initialized():
        connect(ray_head, log_to_driver=False)
    data = _mixed(tmp_path, 3)
    arch, processor = registry.get("qwen2.5vl", "3B"), load_processor(tiny_checkpoint("qwen2_5_vl"))
    here = check_dataset(str(data), arch, processor, max_tokens=200, cache=False)
    calls, text = [], io.StringIO()
    with shown_progress(Console(file=text, width=200), "checking") as shown:
        def progress(done, total):
            calls.append((done, total))
            shown(done, total)

        tasks = check_dataset(str(data), arch, processor, max_tokens=200, cache=False, use_ray=True, batch_rows=5,
                              progress=progress)
    assert tasks.issues == here.issues and tasks.tokens == here.tokens  # every problem, in row order
    assert tasks.summary() == here.summary() and here.summary()["valid_rows"] == 3 and tasks.rows == 15
    assert {i.kind for i in tasks.errors} == {"missing image", "unreadable image", "invalid JSON", "over token budget"}
    assert [i.where.rsplit(":", 1)[-1] for i in tasks.errors if i.kind == "missing image"] == \
        [str(5 * k + 2) for k in range(3)]
    # Progress as the tasks finish (a batch of 5 rows each), up to every row, and on a console that is no terminal
    # a line at every tenth.
    assert calls[0] == (0, 12) and calls[-1] == (12, 12) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert len(calls) == 1 + 3 and "checking: 12/12 rows" in text.getvalue()


def test_the_report_of_an_unchanged_file_is_cached_and_any_change_misses(tmp_path):
    data = _mixed(tmp_path, 1)
    arch = registry.get("qwen2.5vl", "3B")
    check = lambda **kw: check_dataset(str(data), arch, None, **{"max_tokens": 200, **kw})  # noqa: E731
    first = check()
    assert first.cached is None and len(first.errors) == 4
    second = check()
    assert second.cached and second.issues == first.issues and second.tokens == first.tokens
    assert second.summary() == {**first.summary(), "cached": second.cached}
    # Other settings miss: the budget, the system prompt, the task, the architecture; so does --no-cache.
    assert check(max_tokens=300).cached is None and check(system_prompt="Be brief.").cached is None
    assert check(task="vqa").cached is None and check(cache=False).cached is None
    assert check_dataset(str(data), registry.get("qwen3vl", "4B"), None, max_tokens=200).cached is None
    # One byte of the file.
    data.write_bytes(data.read_bytes().replace(b"broken json", b"broken jsoN"))
    assert check().cached is None and check().cached
    # An image replaced under the same name (its size and time change), or one that appears.
    Image.new("RGB", (120, 80), (0, 255, 0)).save(tmp_path / "ok.png")
    assert check().cached is None
    Image.new("RGB", (100, 80)).save(tmp_path / "nope.png")
    fixed = check()
    assert fixed.cached is None and len(fixed.errors) == 3


def test_the_processor_and_the_media_limits_are_part_of_the_key(tmp_path):
    data = _mixed(tmp_path, 1)
    arch = registry.get("qwen2.5vl", "3B")
    processor = load_processor(tiny_checkpoint("qwen2_5_vl"))
    check = lambda p, **kw: check_dataset(str(data), arch, p, max_tokens=200, **kw)  # noqa: E731
    assert check(processor).cached is None and check(processor).cached
    assert check(None).cached is None  # estimated token counts are not the processor's
    assert check(processor, media_limits={"maxPixels": 200_000}).cached is None
    processor.image_processor.size = {"shortest_edge": 3136, "longest_edge": 200_000}  # other resizing
    assert check(processor).cached is None


def test_nvila_lite_tokens_are_counted_by_the_tiling_rule(tmp_path):
    from vray.data.check import _estimate_tokens
    from vray.data.collate import Collator
    from vray.data.sample import Sample

    arch = registry.get("nvila-lite", "2B")
    Image.new("RGB", (1344, 896), (20, 120, 200)).save(tmp_path / "wide.png")
    row = _row("wide", ["wide.png"], "blue")
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    processor = load_processor(tiny_checkpoint("nvila_lite"))
    report = check_dataset(str(tmp_path / "data.jsonl"), arch, processor)
    assert report.token_counts == "processor" and not report.errors
    sample = Sample.model_validate({**row, "images": [str(tmp_path / "wide.png")]})
    encoded = Collator(processor, arch, None).encode(sample, images=[Image.open(tmp_path / "wide.png")])
    assert report.tokens == [encoded.length]
    ids = encoded.tensors["input_ids"].tolist()
    assert ids.count(processor.image_token_id) == 7 * 121  # 6 tiles + thumbnail
    # Without a processor: the estimate's visual part is the same rule (one image alone: tiled).
    assert _estimate_tokens(sample, arch, [(1344, 896)]) - _estimate_tokens(sample, arch, []) == 7 * 122
    estimated = check_dataset(str(tmp_path / "data.jsonl"), arch, None)
    assert estimated.token_counts == "estimated" and estimated.tokens[0] > 7 * 122
