"""NVILA-Lite (vray's own model): the processor follows vray's one visual-token rule, a checkpoint vray writes
reloads with from_pretrained in the published layout, the -hf-preview layout (model_type vila) loads as the same
model, VILA's original layout is refused by name, and nvila-rel1 boxes round-trip."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from vray.archs import registry
from vray.archs.vision import image_grid, vision_dims, visual_tokens
from vray.errors import VrayError
from vray.models.loader import load_model, load_processor, resolve_source

ARCH = ("nvila-lite", "2B")


@pytest.fixture(scope="module")
def tiny():
    return resolve_source("tiny:nvila_lite")


@pytest.fixture(scope="module")
def processor(tiny):
    return load_processor(tiny)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _tile_runs(ids: list[int], placeholder: int, newline: int) -> list[int]:
    """Lengths of the placeholder runs, each of which must be closed by exactly one newline."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == placeholder:
            j = i
            while j < len(ids) and ids[j] == placeholder:
                j += 1
            assert j < len(ids) and ids[j] == newline, f"the run at {i} is not closed by a newline"
            runs.append(j - i)
            i = j + 1
        else:
            i += 1
    return runs


@pytest.mark.parametrize("sizes,tiles", [([(448, 448)], 1), ([(1344, 896)], 7),
                                         ([(448, 448), (1344, 896), (300, 200)], 3)])
def test_image_tokens_follow_the_tiling_rule(processor, sizes, tiles):
    arch = registry.get(*ARCH)
    v = vision_dims(arch.config)
    assert v.tile_tokens == 121 and v.tile_suffix == 1
    images = [_image(w, h, k) for k, (w, h) in enumerate(sizes)]
    text = "".join("<image>" for _ in images) + "\nWhat is shown?"
    out = processor(images=images, text=text, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert tuple(out["pixel_values"].shape) == (tiles, 3, 448, 448)
    runs = _tile_runs(ids, processor.image_token_id, processor.newline_token_id)
    assert runs == [121] * tiles
    alone = len(sizes) == 1
    expected = sum(visual_tokens(arch, w, h, alone=alone) for w, h in sizes)
    assert expected == tiles * 122
    assert expected == sum(image_grid(v, w, h, alone=alone).tokens for w, h in sizes)
    # Placeholders and their newlines; the user's own "\n" after the image stays text, beyond the closing newline.
    assert ids.count(processor.image_token_id) + tiles == expected
    text_only = processor(text="\nWhat is shown?", return_tensors="pt")["input_ids"][0].tolist()
    assert len(ids) == expected + len(text_only)


def test_video_frames_are_one_tile_each(processor):
    arch = registry.get(*ARCH)
    v = vision_dims(arch.config)
    frames = [_image(640, 360, k) for k in range(4)]
    out = processor(videos=[frames], text="<vila/video>Describe.", return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    assert tuple(out["pixel_values_videos"].shape) == (4, 3, 448, 448)
    assert _tile_runs(ids, processor.video_token_id, processor.newline_token_id) == [121] * 4
    assert image_grid(v, 640, 360, frames=4).tokens == 4 * 122 == ids.count(processor.video_token_id) + 4


def _logits(model, processor, image: Image.Image) -> torch.Tensor:
    batch = processor(images=[image], text="<image>\nWhat colour is it?", return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].float()).logits


def _full_weights(model):
    """The (name, tensor) pairs DDPEngine.save streams for Full weights: tied aliases once, then the buffers."""
    from vray.train.engines import _tied_names

    tied = _tied_names(model)
    for name, param in model.named_parameters():
        if name not in tied:
            yield name, param.detach().to("cpu", copy=True)
    names = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if name in names:
            yield name, buffer.detach().to("cpu", copy=True)


@pytest.fixture(scope="module")
def reference(tiny, processor):
    model = load_model(tiny, registry.get(*ARCH), "Float32").eval()
    image = _image(1344, 896, 7)
    return model, image, _logits(model, processor, image)


def test_a_checkpoint_vray_writes_reloads_with_from_pretrained(tiny, processor, reference, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    import vray.models.nvila_lite  # noqa: F401  (registers the Auto classes)
    from vray.train.engines import write_hf_weights

    model, image, expected = reference
    write_hf_weights(model, tmp_path, _full_weights(model))
    keys = set()
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys), sorted(keys)[:5]
    assert not any(k.startswith("vision_tower.encoder") for k in keys)
    assert any(k.startswith("mm_projector.layers.") for k in keys) and any(k.startswith("llm.") for k in keys)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "NVILALiteForConditionalGeneration"
    assert torch.equal(_logits(reloaded, processor, image), expected)


def _preview(tiny, folder, projector="mlp_downsample_3x3_fix"):
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("auto_map", None)
    cfg.update(model_type="vila", mm_projector_type=projector, mm_vision_select_layer=-2,
               mm_vision_select_feature="cls_patch", mm_hidden_size=cfg["vision_config"]["hidden_size"],
               hidden_size=cfg["text_config"]["hidden_size"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_the_hf_preview_layout_is_the_same_model(tiny, processor, reference, tmp_path):
    from transformers import AutoModelForImageTextToText

    import vray.models.nvila_lite  # noqa: F401

    _, image, expected = reference
    folder = _preview(tiny, tmp_path / "preview")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32).eval()
    assert model.config.model_type == "vila"
    assert torch.equal(_logits(model, processor, image), expected)
    wrong = _preview(tiny, tmp_path / "wrong", projector="mlp2x_gelu")
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        AutoModelForImageTextToText.from_pretrained(wrong, trust_remote_code=False)


def test_vilas_original_layout_is_refused_by_name(tmp_path):
    (tmp_path / "llm").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama", "architectures": ["LlavaLlamaModel"]}))
    with pytest.raises(VrayError, match="Efficient-Large-Model/NVILA-Lite-2B-hf"):
        resolve_source(str(tmp_path))


def test_nvila_boxes_round_trip_on_a_non_square_image():
    from vray.data.boxes import BOX_NVILA_REL1, ImageGeometry, PixelBox, format_answer, parse_answer

    arch = registry.get(*ARCH)
    assert arch.box_convention == BOX_NVILA_REL1
    geo = ImageGeometry.unresized(1344, 896)
    boxes = [PixelBox("cat", (100.0, 50.0, 700.0, 880.0)), PixelBox("dog", (1000.5, 10.0, 1344.0, 300.0))]
    text = format_answer(boxes, BOX_NVILA_REL1, geo)
    assert '"bbox"' in text and all(0 <= c <= 1 for item in json.loads(text) for c in item["bbox"])
    back = parse_answer(text, BOX_NVILA_REL1, geo)
    assert [b.label for b in back] == ["cat", "dog"]
    for got, want in zip(back, boxes):
        # three decimals of a fraction: within half a thousandth of the side
        for k, (g, w) in enumerate(zip(got.bbox, want.bbox)):
            side = geo.width if k % 2 == 0 else geo.height
            assert abs(g - w) <= 0.0005 * side + 1e-9, (got, want)
