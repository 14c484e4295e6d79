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


@pytest.mark.parametrize("train_vision", [False, True])
def test_full_fine_tuning_trains_every_part_it_should_and_leaves_no_parameter_without_a_gradient(tiny, processor,
                                                                                                 train_vision):
    """Full: the projector and the language model train, the tower only with full.trainVision; and every trainable
    parameter gets a gradient from one image step (the tower's unused last layer is not built, so DDP finds no
    unused parameter)."""
    from vray.models.loader import prepare_for_training
    from vray.spec import LoraBlock

    arch = registry.get(*ARCH)
    model, _ = prepare_for_training(tiny, arch, "Full", "Float32", None, LoraBlock(), torch.device("cpu"),
                                    train_vision=train_vision)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in dict(model.named_parameters()) if n.startswith("vision_tower.")}
    assert tower and (tower <= trainable) == train_vision and not (tower & trainable and not train_vision)
    assert any(n.startswith("mm_projector.") for n in trainable) and any(n.startswith("llm.") for n in trainable)
    inputs = processor(text=["<image>What colour?"], images=[_image(64, 48)], return_tensors="pt")
    out = model(**inputs)
    out.logits.float().logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_the_tiny_checkpoint_is_in_the_published_layout_and_a_sharded_build_finds_every_weight(tiny):
    """Every tower key is `vision_tower.vision_model.*` as in the -hf repos; a model built on the meta device (fsdp2,
    ZeRO-3) finds each of its parameters in the file through the tower's renaming, and reverting its names (what
    vray's checkpoint writers do) gives the published keys back."""
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    from vray.models.sharded import CheckpointReader, build_empty, checkpoint_key, checkpoint_names

    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"llm", "vision_tower", "mm_projector"}
    assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    model = build_empty(tiny, torch.float32)
    reader = CheckpointReader(tiny)
    try:
        renamed = checkpoint_names(model, reader)
        found = {n: checkpoint_key(n, reader, {}, renamed) for n, _ in model.named_parameters()}
    finally:
        reader.close()
    assert all(found.values()), [n for n, k in found.items() if k is None]
    assert set(found.values()) < keys  # the tower's unused last layer and final norm are read by nobody
    saved = revert_weight_conversion(model, {n: torch.empty(0) for n, _ in model.named_parameters()})
    assert set(saved) == set(found.values())


def test_a_pixel_cap_is_a_tile_budget_for_the_processor_and_the_rule_alike(tiny):
    from vray.plan.memory import sample_shape
    from vray.plan.profile import arch_profile
    from vray.spec import MediaBlock

    arch = registry.get(*ARCH)
    cap = 2 * 448 * 448
    capped = load_processor(tiny, MediaBlock(maxPixels=cap), arch=arch)
    assert capped.max_tiles == 2 and load_processor(tiny, arch=arch).max_tiles == 12
    out = capped(text=["<image>hi"], images=[_image(1344, 896)], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 3  # a 2 x 1 grid and the thumbnail
    assert int((out["input_ids"] == capped.image_token_id).sum()) + 3 == visual_tokens(arch, 1344, 896, cap) == 3 * 122
    # The planner's image keeps its 1024 x 1024 size under the cap: the cap only limits its tiles.
    shape = sample_shape(arch_profile(arch), max_pixels=4 * 448 * 448)
    assert (shape.image_width, shape.visual_tokens) == (1024, 5 * 122)  # 2 x 2 tiles and the thumbnail
    assert sample_shape(arch_profile(arch)).visual_tokens == 10 * 122  # 3 x 3 tiles and the thumbnail


def test_a_batch_of_prompts_tiles_each_prompt_by_its_own_images(processor):
    out = processor(text=["<image>a", "<image><image>b"], images=[_image(1344, 896), _image(64, 64), _image(64, 64)],
                    padding=True, return_tensors="pt")
    assert out["pixel_values"].shape[0] == 7 + 1 + 1
    with pytest.raises(ValueError, match="one text"):
        processor(text=["<image>a", "<image>b"], images=[_image(64, 64)] * 2, images_in_prompt=1)
