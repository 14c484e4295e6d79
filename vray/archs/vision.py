"""How an architecture turns an image into visual tokens: its vision tower's dimensions and resize rule.

One rule for everyone who counts visual tokens: the planner's sample shape (`vray.plan.memory`) and the data
check's estimate when no processor is at hand (`vray.data.check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vray.archs.registry import Architecture


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's dimensions and how images become tokens."""

    kind: str  # "qwen" (dynamic resolution), "internvl" (448 tiles + pixel shuffle), "siglip-s2" (NVILA)
    depth: int
    hidden: int
    intermediate: int
    mlp: str  # "swiglu" | "gelu"
    patch: int
    merge: int  # tokens merged per side (spatial merge, pixel shuffle 1/downsample, or 3x3 pooling)
    temporal_patch: int = 1
    tile: int = 0  # tile side in pixels for tiled towers


def vision_dims(cfg: dict) -> VisionDims:
    """The vision tower of a checkpoint's config.json."""
    mt = cfg.get("model_type", "")
    if mt == "internvl":
        v = cfg["vision_config"]
        size = v["image_size"][0] if isinstance(v["image_size"], list) else v["image_size"]
        patch = v["patch_size"][0] if isinstance(v["patch_size"], list) else v["patch_size"]
        return VisionDims("internvl", v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], "gelu", patch,
                          round(1 / cfg.get("downsample_ratio", 0.5)), 1, size)
    if mt == "llava_llama":
        v = cfg["vision_tower_cfg"]
        return VisionDims("siglip-s2", v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], "gelu",
                          v["patch_size"], 3, 1, v["image_size"])
    v = cfg["vision_config"]
    mlp = "swiglu" if mt == "qwen2_5_vl" else "gelu"
    return VisionDims("qwen", v["depth"], v["hidden_size"], v["intermediate_size"], mlp, v["patch_size"],
                      v["spatial_merge_size"], v.get("temporal_patch_size", 2))


def pixels_for_tokens(arch: Architecture, tokens: int) -> int | None:
    """The most pixels of one image that come to at most `tokens` visual tokens, for a dynamic-resolution tower
    (a processor's `max_pixels`); None for tiled towers, whose processors bound an image by its tile count."""
    v = vision_dims(arch.config)
    if v.kind != "qwen":
        return None
    unit = v.patch * v.merge  # one visual token covers unit x unit pixels
    return max(tokens, 1) * unit * unit


@dataclass(frozen=True)
class VisualGrid:
    """One image (or video) as the vision tower sees it."""

    width: int
    height: int
    tokens: int  # visual tokens in the language model's sequence
    patches: int  # patches through the vision tower


def visual_grid(v: VisionDims, pixels: int, frames: int = 0) -> VisualGrid:
    """The grid of a square image of about `pixels` pixels (`frames` > 0: a video of that many frames)."""
    side = int(math.sqrt(pixels))
    if v.kind == "qwen":
        unit = v.patch * v.merge
        grid = max(1, round(side / unit))
        w = h = grid * unit
        per_image_patches = (w // v.patch) * (h // v.patch)
        steps = max(1, math.ceil(frames / v.temporal_patch)) if frames else 1
        patches = per_image_patches * steps
        return VisualGrid(w, h, patches // (v.merge * v.merge), patches)
    # Tiled towers: dynamic tiling into tiles of `tile` px plus a thumbnail (InternVL, NVILA-Lite).
    tiles_per_side = max(1, round(side / v.tile))
    tiles = tiles_per_side * tiles_per_side + (1 if tiles_per_side > 1 else 0)
    per_tile = (v.tile // v.patch) ** 2
    per_tile_tokens = math.ceil(v.tile / v.patch / v.merge) ** 2
    units = tiles * (max(frames, 1) if frames else 1)
    return VisualGrid(side, side, units * per_tile_tokens, units * per_tile)


def default_max_pixels(arch: Architecture) -> int | None:
    """The pixels one image is resized to at most when the spec sets no media.maxPixels: the family's token cap
    (`Family.image_tokens`) in pixels. None for tiled towers."""
    return pixels_for_tokens(arch, arch.image_tokens) if arch.image_tokens else None


def visual_tokens(arch: Architecture, width: int, height: int, max_pixels: int | None = None) -> int:
    """Visual tokens of one width x height image for an architecture, resized to at most `max_pixels` (default:
    the family's default cap)."""
    cap = max_pixels or default_max_pixels(arch)
    return visual_grid(vision_dims(arch.config), min(width * height, cap) if cap else width * height).tokens
