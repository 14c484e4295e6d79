"""The processor honours the spec's media limits (transformers 5 keeps them in a SizeDict, not a dict)."""

from __future__ import annotations

import pytest
from PIL import Image

from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint
from vray.spec import MediaBlock


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_media_max_pixels_bounds_the_patch_grid(family):
    image = [Image.new("RGB", (1024, 1024))]
    for budget in (40_000, 200_000):
        processor = load_processor(tiny_checkpoint(family), MediaBlock(maxPixels=budget))
        ip = processor.image_processor
        t, h, w = ip(images=image, return_tensors="pt")["image_grid_thw"][0].tolist()
        assert h * w * ip.patch_size**2 <= budget, (family, budget, h, w)
        assert h * w * ip.patch_size**2 > budget / 2  # the budget is used, not ignored


def test_an_image_defaults_to_1280_visual_tokens_of_its_family(tmp_path):
    import json
    import shutil

    from vray.archs import registry
    from vray.spec import validate_spec

    image = [Image.new("RGB", (4096, 3072))]  # 12.6 MP
    for name, size, family, unit in (("qwen2.5vl", "3B", "qwen2_5_vl", 28), ("qwen3vl", "2B", "qwen3_vl", 32)):
        arch = registry.get(name, size)
        # A checkpoint whose own processor allows 16384 visual tokens an image, as the published ones do.
        folder = shutil.copytree(tiny_checkpoint(family), tmp_path / family)
        config = json.loads((folder / "processor_config.json").read_text())
        config["image_processor"]["size"] = {"longest_edge": 16384 * unit * unit, "shortest_edge": 4 * unit * unit}
        (folder / "processor_config.json").write_text(json.dumps(config))

        def tokens(media: MediaBlock, source=folder) -> int:
            ip = load_processor(source, media, arch=arch).image_processor
            t, h, w = ip(images=image, return_tensors="pt")["image_grid_thw"][0].tolist()
            return h * w // ip.merge_size**2

        spec = validate_spec({"architecture": {"name": name, "size": size}}).resolved()
        assert spec.media.maxPixels is None and spec.media_limits.maxPixels == 1280 * unit * unit  # the planner's
        assert 1100 < tokens(spec.media) <= 1280, family
        assert tokens(MediaBlock(maxPixels=4096 * 4096)) > 10_000  # what a spec sets is honoured
        # A checkpoint that allows fewer pixels than the default keeps its own bound.
        assert tokens(MediaBlock(), tiny_checkpoint(family)) <= 65536 // unit**2
    assert MediaBlock(minPixels=2_000_000).default_cap(registry.get("qwen3vl", "2B")) == 2_000_000
    assert MediaBlock().default_cap(registry.get("internvl3.5", "8B")) is None  # tiles bound InternVL


@pytest.mark.parametrize("family,arch", [("qwen2_5_vl", ("qwen2.5vl", "3B")), ("qwen3_5", ("qwen3.5", "0.8B"))])
def test_a_model_built_without_weights_fills_like_from_pretrained(family, arch):
    """The FSDP2 path (built on meta, then each parameter filled from the checkpoint) gives the same weights as
    from_pretrained, ties kept, and LoRA adapters equal to what peft draws from the same random state."""
    import torch

    from vray.archs import registry
    from vray.models import sharded
    from vray.models.loader import apply_lora, load_model, prepare_for_training
    from vray.spec import LoraBlock, QuantizationBlock

    a = registry.get(*arch)
    path = tiny_checkpoint(family)
    torch.manual_seed(0)
    built, _ = prepare_for_training(path, a, "LoRA", "BFloat16", QuantizationBlock(), LoraBlock(), torch.device("cpu"),
                                    strategy="fsdp2")
    assert sharded.is_on_meta(built)
    state = getattr(built, sharded.LORA_RNG)
    sharded.materialize_sharded(built, path, torch.device("cpu"), seed=0)
    base = load_model(path, a, "BFloat16")
    torch.set_rng_state(state)
    reference = dict(apply_lora(base, a, LoraBlock()).named_parameters())
    mine = dict(built.named_parameters())
    assert mine.keys() == reference.keys()
    for name, p in reference.items():
        assert torch.equal(mine[name], p), name
    b = built.get_base_model()
    if b.config.get_text_config().tie_word_embeddings:
        assert b.get_output_embeddings().weight is b.get_input_embeddings().weight
