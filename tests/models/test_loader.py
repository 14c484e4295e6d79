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
