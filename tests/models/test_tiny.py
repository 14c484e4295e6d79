"""Tiny real-architecture checkpoints load like hub checkpoints; synthetic datasets are what they claim."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vray.archs import registry
from vray.data import synthetic
from vray.data.io import read_jsonl
from vray.models.tiny import FAMILIES, REFERENCE, tiny_checkpoint
from vray.models.tiny_tokenizer import special_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_through_from_pretrained(family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_checkpoint(family)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "processor_config.json"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    arch = registry.get(*REFERENCE[family])
    assert config["model_type"] == family == arch.model_type

    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == arch.transformers_class.split(".")[-1]
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    tok = processor.tokenizer
    for token in special_tokens(family):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{token} is split by the {family} tokenizer"
    assert model.config.get_text_config().vocab_size == len(tok)

    image = Image.new("RGB", (112, 112), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    image_id = model.config.image_token_id
    expected = 121 if family == "nvila_lite" else 16  # NVILA-Lite: one 448 px tile, 11 x 11 after its 3x3 merge
    assert int((inputs["input_ids"] == image_id).sum()) == expected  # the processor expanded the placeholder
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_checkpoint_structure_follows_the_real_family():
    from transformers import AutoConfig

    q35 = AutoConfig.from_pretrained(tiny_checkpoint("qwen3_5")).text_config
    assert q35.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    moe = AutoConfig.from_pretrained(tiny_checkpoint("qwen3_vl_moe")).text_config
    assert moe.num_experts > 1 and moe.num_experts_per_tok > 1
    q3 = AutoConfig.from_pretrained(tiny_checkpoint("qwen3_vl")).vision_config
    assert q3.deepstack_visual_indexes


def test_tiny_checkpoint_is_cached_and_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = tiny_checkpoint("qwen2_5_vl", tmp_path / "a")
    b = tiny_checkpoint("qwen2_5_vl", tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    assert tiny_checkpoint("qwen2_5_vl", tmp_path / "a") == a


def test_unknown_tiny_family_is_a_clear_error():
    from vray.errors import VrayError

    with pytest.raises(VrayError, match="choose one of qwen2_5_vl"):
        tiny_checkpoint("llava")


@pytest.mark.parametrize("uri", ["synthetic:vqa", "synthetic:grounding", "synthetic:freeform"])
def test_synthetic_datasets_have_disjoint_splits_of_valid_samples(uri):
    train_path, eval_path = synthetic.split_paths(uri + "?train=24&eval=8&seed=3")
    train, held_out = read_jsonl(train_path), read_jsonl(eval_path)
    assert (len(train), len(held_out)) == (24, 8)
    assert not {s.id for s in train} & {s.id for s in held_out}
    assert not {s.images[0] for s in train} & {s.images[0] for s in held_out}
    task = synthetic.parse_uri(uri).task
    assert {s.task for s in train + held_out} == {task}
    again = synthetic.materialize(uri + "?train=24&eval=8&seed=3")
    assert again == train_path.parent


def test_synthetic_answers_match_the_pixels():
    train_path, _ = synthetic.split_paths("synthetic:grounding?train=16&eval=4")
    for sample in read_jsonl(train_path):
        image = Image.open(sample.images[0]).convert("RGB")
        for box in sample.answer.boxes:
            colour = box.label.split()[0]
            x0, y0, x1, y1 = box.bbox
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
            # Every shape covers the centre of its box (triangles included).
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2 + (y1 - y0) / 6)
            assert image.getpixel((cx, cy)) == synthetic.COLOURS[colour]
    vqa_path, _ = synthetic.split_paths("synthetic:vqa?train=16&eval=4")
    for sample in read_jsonl(vqa_path):
        image = Image.open(sample.images[0]).convert("RGB")
        assert synthetic.COLOURS[sample.answer.text] in {c for _, c in image.getcolors(maxcolors=10_000)}


def test_bad_synthetic_uri_is_a_clear_error():
    from vray.errors import VrayError

    with pytest.raises(VrayError, match="synthetic:vqa, synthetic:grounding or synthetic:freeform"):
        synthetic.parse_uri("synthetic:detection")
    with pytest.raises(VrayError, match="unknown option 'rows'"):
        synthetic.parse_uri("synthetic:vqa?rows=3")
