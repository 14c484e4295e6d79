"""Samples, box conventions, collation (labels = answer tokens + end of turn) and task metrics."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vray.archs import registry
from vray.archs.registry import BOX_INTERNVL_REL1000, BOX_NVILA_REL1, BOX_QWEN3_REL1000, BOX_QWEN25_ABS
from vray.data.boxes import ImageGeometry, PixelBox, format_answer, from_model, parse_answer, to_model
from vray.data.collate import END_OF_TURN, IGNORE_INDEX, Collator, image_geometry
from vray.data.io import read_jsonl
from vray.data.metrics import box_recall, exact_match, normalize_answer, score, token_f1
from vray.data.sample import Sample
from vray.errors import DataError
from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint

GEO = ImageGeometry(width=640, height=480, resized_width=644, resized_height=476)


@pytest.mark.parametrize("convention", [BOX_QWEN25_ABS, BOX_QWEN3_REL1000, BOX_INTERNVL_REL1000, BOX_NVILA_REL1])
def test_box_round_trip_within_one_unit_of_the_model_grid(convention):
    box = (101.0, 37.5, 388.2, 401.9)
    coords = to_model(box, convention, GEO)
    back = from_model(coords, convention, GEO)
    unit = {BOX_QWEN25_ABS: 640 / 644, BOX_QWEN3_REL1000: 0.64, BOX_INTERNVL_REL1000: 0.64, BOX_NVILA_REL1: 0.64}[convention]
    assert all(abs(a - b) <= unit for a, b in zip(box, back))
    text = format_answer([PixelBox("red circle", box)], convention, GEO)
    (parsed,) = parse_answer(text, convention, GEO)
    assert parsed.label == "red circle"
    assert all(abs(a - b) <= unit for a, b in zip(box, parsed.bbox))


def test_each_family_writes_its_own_form():
    box = [PixelBox("cat", (64.0, 48.0, 320.0, 240.0))]
    assert json.loads(format_answer(box, BOX_QWEN3_REL1000, GEO)) == [{"bbox_2d": [100, 100, 500, 500], "label": "cat"}]
    assert json.loads(format_answer(box, BOX_QWEN25_ABS, GEO)) == [{"bbox_2d": [64, 48, 322, 238], "label": "cat"}]
    assert format_answer(box, BOX_INTERNVL_REL1000, GEO) == "<ref>cat</ref><box>[[100, 100, 500, 500]]</box>"


def test_parse_tolerates_fences_and_garbage():
    text = 'Here you go:\n```json\n[{"bbox_2d": [100, 100, 500, 500], "label": "cat"}, {"bbox_2d": [1, 2], "label": "x"}]\n```'
    (box,) = parse_answer(text, BOX_QWEN3_REL1000, GEO)
    assert box.bbox == (64.0, 48.0, 320.0, 240.0)
    assert parse_answer("no boxes here", BOX_QWEN3_REL1000, GEO) == []
    assert parse_answer("<ref>cat</ref><box>[[1, 2, 3]]</box>", BOX_INTERNVL_REL1000, GEO) == []


def test_metrics():
    assert normalize_answer("  The Red!  ") == "red"
    assert exact_match("Red.", "red") == 1.0 and exact_match("blue", "red") == 0.0
    assert token_f1("a red circle", "a red square") == pytest.approx(0.5)
    ref = [PixelBox("red circle", (10, 10, 50, 50)), PixelBox("blue square", (60, 60, 100, 100))]
    pred = [PixelBox("red circle", (12, 12, 50, 52)), PixelBox("blue square", (0, 0, 20, 20))]
    assert box_recall(pred, ref) == (1, 2)
    assert box_recall([PixelBox("green circle", (10, 10, 50, 50))], ref[:1]) == (0, 1)  # labels must agree
    # One prediction cannot match two references.
    assert box_recall([PixelBox("red circle", (10, 10, 50, 50))], [ref[0], ref[0]]) == (1, 2)
    geo = ImageGeometry.unresized(100, 100)
    answer = format_answer(pred, BOX_QWEN3_REL1000, geo)
    assert score("phrase_grounding", answer, "", ref, BOX_QWEN3_REL1000, geo) == (1.0, 2.0)


def test_sample_validation_names_the_line_and_the_problem(tmp_path):
    good = {"id": "a", "task": "vqa", "images": ["x.png"],
            "conversation": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]}
    rows = [
        json.dumps(good),
        "{not json",
        json.dumps({**good, "conversation": [{"role": "user", "text": "q"}]}),
        json.dumps({**good, "task": "phrase_grounding", "conversation": [
            {"role": "user", "text": "q"}, {"role": "assistant", "boxes": [{"label": "c", "bbox": [5, 5, 1, 9]}]}]}),
        json.dumps({**good, "extra": 1}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    msg = str(exc.value)
    assert "4 bad row(s)" in msg
    assert f"{path}:2: not valid JSON" in msg
    assert f"{path}:3:" in msg and "must end with an assistant turn" in msg
    assert f"{path}:4:" in msg and "degenerate" in msg
    assert f"{path}:5:" in msg and "extra" in msg
    (tmp_path / "ok.jsonl").write_text(rows[0] + "\n")
    (sample,) = read_jsonl(tmp_path / "ok.jsonl")
    assert sample.images == (str(tmp_path / "x.png"),)  # relative paths resolve against the file's folder


def _sample(task: str, answer: dict) -> Sample:
    return Sample.model_validate({"id": "s", "task": task, "images": ["unused.png"],
                                  "conversation": [{"role": "user", "text": "Locate the red circle."}, answer]})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl"])
def test_labels_are_exactly_the_answer_and_the_end_of_turn(family):
    from vray.models.tiny import REFERENCE

    arch = registry.get(*REFERENCE[family])
    processor = load_processor(tiny_checkpoint(family))
    collator = Collator(processor, arch, "You are a test.")
    image = Image.new("RGB", (200, 150), (240, 240, 240))
    sample = _sample("phrase_grounding", {"role": "assistant", "boxes": [{"label": "red circle", "bbox": [20, 30, 120, 140]}]})
    enc = collator.encode(sample, images=[image])
    ids, labels = enc.tensors["input_ids"], enc.tensors["labels"]
    answer_ids = processor.tokenizer(enc.reference, add_special_tokens=False)["input_ids"]
    eot = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    taught = labels[labels != IGNORE_INDEX].tolist()
    assert taught == answer_ids + [eot]
    assert ids[-len(taught):].tolist() == taught  # the answer closes the sequence
    # The answer holds the box in the family's convention, computed from the processor's resize.
    geo = image_geometry(processor, arch, image)
    (parsed,) = parse_answer(enc.reference, arch.box_convention, geo)
    assert all(abs(a - b) <= 2 for a, b in zip(parsed.bbox, (20, 30, 120, 140)))
    # A generation prompt has no labels and ends where the answer would start.
    prompt = collator.encode(sample, with_answer=False, images=[image])
    assert "labels" not in prompt.tensors
    assert torch.equal(prompt.tensors["input_ids"], ids[: len(ids) - len(taught)])


def test_qwen25_boxes_use_the_resized_image(tmp_path):
    arch = registry.get("qwen2.5vl", "3B")
    processor = load_processor(tiny_checkpoint("qwen2_5_vl"))
    image = Image.new("RGB", (300, 130))
    geo = image_geometry(processor, arch, image)
    grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    assert (geo.resized_height, geo.resized_width) == (int(grid[1]) * patch, int(grid[2]) * patch)
    assert (geo.resized_width, geo.resized_height) != (300, 130)


def test_batches_pad_right_for_training_and_left_for_generation():
    arch = registry.get("qwen3vl", "2B")
    processor = load_processor(tiny_checkpoint("qwen3_vl"))
    collator = Collator(processor, arch, None)
    short = _sample("vqa", {"role": "assistant", "text": "red"})
    long = _sample("vqa", {"role": "assistant", "text": "a red circle and a blue square"})
    images = [Image.new("RGB", (128, 128))]
    encoded = [collator.encode(short, images=images), collator.encode(long, images=images)]
    batch = collator.batch(encoded)
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["attention_mask"][0, -1] == 0 and batch["labels"][0, -1] == IGNORE_INDEX
    assert batch["pixel_values"].shape[0] == 2 * encoded[0].tensors["pixel_values"].shape[0]
    left = collator.batch([collator.encode(s, with_answer=False, images=images) for s in (short, long)], left_pad=True)
    assert left["attention_mask"][:, -1].tolist() == [1, 1]


def test_unreadable_image_names_the_sample(tmp_path):
    arch = registry.get("qwen2.5vl", "3B")
    collator = Collator(load_processor(tiny_checkpoint("qwen2_5_vl")), arch, None)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sample = Sample.model_validate({"id": "row-7", "task": "vqa", "images": [str(tmp_path / "broken.png")],
                                    "conversation": [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]})
    with pytest.raises(DataError, match="sample 'row-7': image .*broken.png.* cannot be read"):
        collator.encode(sample)
