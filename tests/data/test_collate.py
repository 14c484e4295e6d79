"""Collation: every answer learned (and nothing else), media where the tags are, video, reasoning, budgets."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vray.archs import registry
from vray.archs.registry import ARCHITECTURES
from vray.data.boxes import parse_answer
from vray.data.collate import END_OF_TURN, IGNORE_INDEX, Collator, image_geometry
from vray.data.sample import Sample
from vray.errors import DataError
from vray.models.loader import load_processor
from vray.models.tiny import REFERENCE, tiny_checkpoint


def _collator(family: str, **kw) -> Collator:
    return Collator(load_processor(tiny_checkpoint(family)), registry.get(*REFERENCE[family]), "Sys.", **kw)


def _sample(conversation, images=(), videos=(), task="vqa") -> Sample:
    return Sample.model_validate({"id": "s", "task": task, "images": list(images), "videos": list(videos),
                                  "conversation": conversation})


def _taught_spans(labels: torch.Tensor) -> list[list[int]]:
    spans, cur = [], []
    for v in labels.tolist():
        if v == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            cur.append(v)
    return spans + ([cur] if cur else [])


def test_every_answer_of_a_multi_turn_conversation_is_learned():
    c = _collator("qwen2_5_vl")
    tok = c.processor.tokenizer
    img = Image.new("RGB", (120, 90), (10, 200, 10))
    s = _sample([{"role": "user", "text": "<image>What colour?"}, {"role": "assistant", "text": "green"},
                 {"role": "user", "text": "And the shape?"}, {"role": "assistant", "text": "a square"}], ["x.png"])
    enc = c.encode(s, images=[img])
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    spans = _taught_spans(enc.tensors["labels"])
    assert spans == [tok("green", add_special_tokens=False)["input_ids"] + [eot],
                     tok("a square", add_special_tokens=False)["input_ids"] + [eot]]
    text = tok.decode(enc.tensors["input_ids"])
    assert text.count("<|im_start|>assistant") == 2 and text.index("green") < text.index("And the shape?")
    # The generation prompt is the context before the last answer, the earlier answer included.
    prompt = c.encode(s, with_answer=False, images=[img])
    assert "green" in tok.decode(prompt.tensors["input_ids"]) and "a square" not in tok.decode(prompt.tensors["input_ids"])


def test_images_go_where_the_tags_are():
    c = _collator("qwen3_vl")
    tok = c.processor.tokenizer
    red, blue = Image.new("RGB", (128, 128), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    s = _sample([{"role": "user", "text": "Compare <image> with <image> please."}, {"role": "assistant", "text": "ok"}],
                ["a.png", "b.png"])
    enc = c.encode(s, images=[red, blue])
    text = tok.decode(enc.tensors["input_ids"])
    first, second = text.index("<|vision_start|>"), text.rindex("<|vision_start|>")
    assert text.index("Compare") < first < text.index("with") < second < text.index("please")
    assert enc.tensors["image_grid_thw"].shape[0] == 2
    untagged = _sample([{"role": "user", "text": "Colour?"}, {"role": "assistant", "text": "red"}], ["a.png"])
    t2 = tok.decode(c.encode(untagged, images=[red]).tensors["input_ids"])
    assert t2.index("<|vision_start|>") < t2.index("Colour?")  # untagged media open the first user turn


def _mp4(path, frames=8):
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=4)
    s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    for i in range(frames):
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 25, np.uint8), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl"])
def test_videos_from_files_and_frame_lists(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    _mp4(tmp_path / "clip.mp4")
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(tmp_path / f"f{i}.png")
    c = _collator(family, max_frames=4)
    s = _sample([{"role": "user", "text": "<video>What changes?"}, {"role": "assistant", "text": "it brightens"}],
                videos=[{"path": str(tmp_path / "clip.mp4")}])
    frames = _sample([{"role": "user", "text": "<video>What changes?"}, {"role": "assistant", "text": "it brightens"}],
                     videos=[{"frames": [str(tmp_path / f"f{i}.png") for i in range(4)], "fps": 2}])
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint(family))
    for sample in (s, frames):
        enc = c.encode(sample)
        assert enc.visual_tokens > 0
        with torch.no_grad():
            loss = model(**c.batch([enc])).loss
        assert torch.isfinite(loss)


def test_reasoning_traces_are_learned_and_the_thinking_switch_follows_them():
    c = _collator("qwen3_5")
    tok = c.processor.tokenizer
    img = Image.new("RGB", (128, 128))
    plain = _sample([{"role": "user", "text": "Colour?"}, {"role": "assistant", "text": "red"}], ["a.png"])
    thought = _sample([{"role": "user", "text": "Colour?"},
                       {"role": "assistant", "text": "<think>\nThe square is red.\n</think>\n\nred"}], ["a.png"])
    p_plain = tok.decode(c.encode(plain, with_answer=False, images=[img]).tensors["input_ids"])
    p_thought = tok.decode(c.encode(thought, with_answer=False, images=[img]).tensors["input_ids"])
    assert p_plain.endswith("<think>\n\n</think>\n\n")  # thinking off: the template closes an empty block
    assert not p_thought.rstrip().endswith("</think>")
    enc = c.encode(thought, images=[img])
    taught = tok.decode([t for t in enc.tensors["labels"].tolist() if t != IGNORE_INDEX])
    assert "<think>" in taught and "The square is red." in taught and taught.endswith("red" + END_OF_TURN)
    assert enc.reference.startswith("<think>")
    from vray.data.metrics import score

    assert score("vqa", "<think>hmm</think> red", enc.reference, [], "qwen3-rel1000", None) == (1.0, 1.0)


def test_a_sample_over_the_token_budget_is_refused():
    c = _collator("qwen2_5_vl", max_tokens=40)
    s = _sample([{"role": "user", "text": "Colour?"}, {"role": "assistant", "text": "red"}], ["a.png"])
    with pytest.raises(DataError, match=r"sample 's' is \d+ tokens \(16 visual \+ \d+ text\), over the budget of 40"):
        c.encode(s, images=[Image.new("RGB", (112, 112))])


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.key)
def test_box_round_trip_for_every_architecture(arch):
    # An image size the processor resizes (not a multiple of the patch grid), boxes back in original pixels.
    family = arch.model_type if arch.model_type in REFERENCE else "qwen2_5_vl"
    processor = load_processor(tiny_checkpoint(family))
    image = Image.new("RGB", (333, 257))
    geo = image_geometry(processor, arch, image)
    if arch.box_convention == "qwen2.5vl-abs-resized":
        assert (geo.resized_width, geo.resized_height) != (333, 257)
    s = _sample([{"role": "user", "text": "Locate the cat."},
                 {"role": "assistant", "boxes": [{"label": "cat", "bbox": [21.0, 33.5, 300.2, 250.0]}]}],
                ["a.png"], task="phrase_grounding")
    c = Collator(processor, arch, None)
    enc = c.encode(s, images=[image])
    (box,) = parse_answer(enc.reference, arch.box_convention, geo)
    assert box.label == "cat"
    unit = max(333 / geo.resized_width, 257 / geo.resized_height) if arch.box_convention.endswith("resized") else 0.34
    assert all(abs(a - b) <= unit + 1e-6 for a, b in zip(box.bbox, (21.0, 33.5, 300.2, 250.0)))
