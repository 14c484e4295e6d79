"""Importers: one small file per format, written as that project documents it, converted and read back."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli
from vray.data.importers import convert
from vray.data.io import read_samples
from vray.errors import DataError


def _png(path: Path, size=(64, 48), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _read(written: str):
    result = read_samples(written)
    assert not result.problems, result.problems
    return result.samples


def test_coco_instances_become_grounding_samples(tmp_path):
    src = tmp_path / "coco"
    _png(src / "images" / "a.jpg", (640, 480))
    _png(src / "images" / "b.jpg", (320, 240))
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 20, 100, 50], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [300, 200, 40, 40], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 50, 60], "iscrowd": 0},
            {"id": 13, "image_id": 2, "category_id": 2, "bbox": [5, 5, 0, 10], "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1},
        ],
    }
    (src / "annotations.json").write_text(json.dumps(doc))
    written, result = convert(str(src / "annotations.json"), "coco", str(tmp_path / "out"),
                              images_root=str(src / "images"))
    samples = _read(written)
    assert {s.id for s in samples} == {"coco-1-cat", "coco-1-dog"}
    cat = next(s for s in samples if s.id == "coco-1-cat")
    assert cat.task == "phrase_grounding" and Path(cat.images[0]).exists()
    assert [b.bbox for b in cat.answer.boxes] == [(10, 20, 110, 70), (300, 200, 340, 240)]  # xywh -> xyxy
    assert {b.label for b in cat.answer.boxes} == {"cat"} and "every cat" in cat.conversation[0].text
    assert result.skipped == {"degenerate box (zero width or height)": 1, "crowd annotation (no single box)": 1}


def test_coco_captions_become_freeform_samples(tmp_path):
    _png(tmp_path / "x.jpg")
    doc = {"images": [{"id": 7, "file_name": "x.jpg"}],
           "annotations": [{"id": 1, "image_id": 7, "caption": "A red square."}, {"id": 2, "image_id": 7, "caption": " "},
                           {"id": 3, "image_id": 9, "caption": "orphan"}]}
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    written, result = convert(str(tmp_path / "captions.json"), "coco-captions", str(tmp_path / "out"))
    (sample,) = _read(written)
    assert sample.task == "freeform" and sample.answer.text == "A red square."
    assert result.skipped == {"empty caption": 1, "caption of an unknown image": 1}


def test_llamafactory_sharegpt_messages_and_alpaca(tmp_path):
    _png(tmp_path / "imgs" / "1.png")
    _png(tmp_path / "imgs" / "2.png")
    records = [
        {"conversations": [{"from": "human", "value": "<image>Who is this?"}, {"from": "gpt", "value": "A cat."},
                           {"from": "human", "value": "And this <image>?"}, {"from": "gpt", "value": "A dog."}],
         "system": "Be brief.", "images": ["imgs/1.png", "imgs/2.png"]},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["imgs/1.png"]},
        {"instruction": "Describe", "input": "briefly", "output": "Red.", "images": ["imgs/2.png"]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]},
    ]
    (tmp_path / "mllm.json").write_text(json.dumps(records))
    written, result = convert(str(tmp_path / "mllm.json"), "llamafactory", str(tmp_path / "out"), task="vqa")
    samples = _read(written)
    assert len(samples) == 3 and all(s.task == "vqa" for s in samples)
    multi = samples[0]
    assert [t.role for t in multi.conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert multi.conversation[3].text == "And this <image>?" and len(multi.images) == 2
    assert all(Path(i).exists() for s in samples for i in s.images)
    assert samples[2].conversation[0].text == "Describe\nbriefly"
    assert sum(result.skipped.values()) == 1 and "function_call" in next(iter(result.skipped))


def test_ms_swift_grounding_with_real_and_norm1000_boxes(tmp_path):
    _png(tmp_path / "animal.png", (200, 100))
    records = [
        {"messages": [{"role": "user", "content": "<image>Find the <ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
         "images": ["animal.png"], "objects": {"ref": ["sheep"], "bbox": [[10, 20, 60, 80]], "bbox_type": "real", "image_id": [0]}},
        {"messages": [{"role": "user", "content": "<image>Where are the <ref-object> and the <ref-object>?"},
                      {"role": "assistant", "content": "<bbox><bbox>"}],
         "images": ["animal.png"],
         "objects": {"ref": ["cow", "goat"], "bbox": [[0, 0, 500, 500], [500, 500, 1000, 1000]], "bbox_type": "norm1000",
                     "image_id": [0, 0]}},
        {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A sheep."}],
         "images": ["animal.png"]},
    ]
    (tmp_path / "swift.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    written, _ = convert(str(tmp_path / "swift.jsonl"), "ms-swift", str(tmp_path / "out"))
    real, norm, plain = _read(written)
    assert real.task == "phrase_grounding" and real.conversation[0].text == "<image>Find the sheep"
    assert real.answer.boxes[0].bbox == (10, 20, 60, 80) and real.answer.boxes[0].label == "sheep"
    assert [b.bbox for b in norm.answer.boxes] == [(0, 0, 100, 50), (100, 50, 200, 100)]
    assert [b.label for b in norm.answer.boxes] == ["cow", "goat"]
    assert plain.task == "freeform" and plain.answer.text == "A sheep."


def test_llava_conversations(tmp_path):
    _png(tmp_path / "coco" / "0001.jpg")
    records = [{"id": "0001", "image": "coco/0001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the bus?"}, {"from": "gpt", "value": "Red."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    written, _ = convert(str(tmp_path / "llava.json"), "llava", str(tmp_path / "out"), task="vqa")
    (sample,) = _read(written)
    assert sample.id == "0001" and sample.conversation[0].text == "<image>What colour is the bus?"
    assert Path(sample.images[0]).exists()


def test_openai_chat_with_image_parts(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    _png(tmp_path / "local.png")
    records = [
        {"messages": [{"role": "system", "content": "You answer colours."},
                      {"role": "user", "content": [{"type": "text", "text": "Colour? "},
                                                   {"type": "image_url", "image_url": {"url": data_url}}]},
                      {"role": "assistant", "content": "blue"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "local.png"}},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    written, result = convert(str(tmp_path / "chat.jsonl"), "openai", str(tmp_path / "out"), task="vqa")
    embedded, local = _read(written)
    assert embedded.images[0].startswith("data:image/png;base64,")
    assert embedded.conversation[1].text == "Colour? <image>" and embedded.system == "You answer colours."
    assert Path(local.images[0]).exists()
    assert sum(result.skipped.values()) == 1


def test_copy_images_and_parquet_keep_paths_valid(tmp_path):
    _png(tmp_path / "src" / "a.png")
    records = [{"id": "s1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                                 {"from": "gpt", "value": "a"}]}]
    (tmp_path / "src" / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    written, _ = convert(str(tmp_path / "src" / "llava.json"), "llava", str(out), parquet=True, copy_images=True)
    assert written.endswith("data.parquet")
    (tmp_path / "src" / "a.png").unlink()  # the copy is what the dataset points at now
    moved = tmp_path / "moved"
    out.rename(moved)  # relative paths: the folder can move
    (sample,) = _read(str(moved))
    assert Path(sample.images[0]).exists() and str(moved) in sample.images[0]


def test_unknown_format_and_empty_result_are_clear_errors(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataError, match="did you mean 'llava'"):
        convert(str(tmp_path / "x.json"), "lava", str(tmp_path / "out"))
    with pytest.raises(DataError, match="gave no samples"):
        convert(str(tmp_path / "x.json"), "llava", str(tmp_path / "out"))


def test_cli_convert(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]))
    proc = run_cli("data", "convert", str(tmp_path / "llava.json"), "--from", "llava", "--to", str(tmp_path / "out"),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "out" / "data.jsonl")
    assert "converted 1 sample(s)" in proc.stderr
