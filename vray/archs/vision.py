"""How an architecture turns an image into visual tokens: its vision tower's dimensions and resize rule.

One rule for everyone who counts visual tokens: the planner's sample shape (`vray.plan.memory`) and the data
check's estimate when no processor is at hand (`vray.data.check`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vray.archs.registry import Architecture

# NVILA-Lite (model types `nvila_lite` and `vila`): SigLIP features of 448 px tiles, merged 3 x 3 by the projector
# (121 tokens a tile, then a newline token); one image alone is cut into 1-12 tiles plus a thumbnail.
NVILA_MODEL_TYPES = ("nvila_lite", "vila")
NVILA_MERGE = 3
NVILA_MAX_TILES = 12


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's dimensions and how images become tokens."""

    kind: str  # "qwen" (dynamic resolution), "internvl" (448 tiles + pixel shuffle), "nvila" (448 tiles + 3x3 merge)
    depth: int
    hidden: int
    intermediate: int
    mlp: str  # "swiglu" | "gelu"
    patch: int
    merge: int  # tokens merged per side (spatial merge, pixel shuffle 1/downsample, or 3x3 pooling)
    temporal_patch: int = 1
    tile: int = 0  # tile side in pixels for tiled towers
    max_tiles: int = 0  # NVILA-Lite: the most tiles one image is cut into (a thumbnail tile comes on top)
    tile_suffix: int = 0  # tokens after each tile's visual tokens (NVILA-Lite: one newline)

    @property
    def tile_tokens(self) -> int:
        """Visual tokens of one tile: its patch grid zero-padded to a multiple of `merge`, merged `merge` x `merge`
        (NVILA-Lite: 448 / 14 = 32 patches a side, padded to 33, 11 x 11 = 121)."""
        return tile_tokens(self.tile, self.patch, self.merge)


def tile_tokens(tile: int, patch: int, merge: int) -> int:
    """Visual tokens of one `tile`-pixel tile: (tile / patch) patches a side, zero-padded to a multiple of `merge`,
    merged `merge` x `merge`."""
    return math.ceil(tile / patch / merge) ** 2


def vision_dims(cfg: dict) -> VisionDims:
    """The vision tower of a checkpoint's config.json."""
    mt = cfg.get("model_type", "")
    if mt == "internvl":
        v = cfg["vision_config"]
        size = v["image_size"][0] if isinstance(v["image_size"], list) else v["image_size"]
        patch = v["patch_size"][0] if isinstance(v["patch_size"], list) else v["patch_size"]
        return VisionDims("internvl", v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], "gelu", patch,
                          round(1 / cfg.get("downsample_ratio", 0.5)), 1, size)
    if mt in NVILA_MODEL_TYPES:
        v = cfg["vision_config"]
        # The tower runs up to its second-to-last layer (NVILA-Lite's features are that layer's output).
        depth = v["num_hidden_layers"] + 1 + int(cfg.get("mm_vision_select_layer", -2))
        return VisionDims("nvila", depth, v["hidden_size"], v["intermediate_size"], "gelu",
                          v["patch_size"], NVILA_MERGE, 1, v["image_size"], NVILA_MAX_TILES, 1)
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
    if v.kind == "nvila":
        return image_grid(v, side, side, frames)
    # InternVL: dynamic tiling into tiles of `tile` px plus a thumbnail, estimated for a square image.
    tiles_per_side = max(1, round(side / v.tile))
    tiles = tiles_per_side * tiles_per_side + (1 if tiles_per_side > 1 else 0)
    per_tile = (v.tile // v.patch) ** 2
    units = tiles * (max(frames, 1) if frames else 1)
    return VisualGrid(side, side, units * v.tile_tokens, units * per_tile)


def tile_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of 448-style tiles one image alone is cut into (NVILA-Lite's dynamic tiling, as InternVL's):
    of the grids of 1 to `max_tiles` tiles, the one whose aspect ratio is closest to the image's; on a tie, the
    larger grid when the image has more than half its pixels. Candidates are tried by tile count, then columns."""
    aspect = width / height
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda g: (g[0] * g[1], g[0]))
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def image_tiles(v: VisionDims, width: int, height: int, alone: bool = True, max_tiles: int | None = None) -> int:
    """Tiles the tower sees for one image of a tiled family: NVILA-Lite cuts an image that is alone in its prompt
    into `tile_grid` tiles, plus a thumbnail when there is more than one; each image of a several-image prompt is
    one tile."""
    if not alone:
        return 1
    cols, rows = tile_grid(width, height, v.tile, max_tiles or v.max_tiles)
    return cols * rows + (1 if cols * rows > 1 else 0)


def max_tiles_for(v: VisionDims, max_pixels: int | None) -> int:
    """The tile budget of one image under a pixel cap (`media.maxPixels`): the whole tiles that fit in it, at least
    one, at most the family's own."""
    if not max_pixels:
        return v.max_tiles
    return max(1, min(v.max_tiles, max_pixels // (v.tile * v.tile)))


def image_grid(v: VisionDims, width: int, height: int, frames: int = 0, alone: bool = True,
               max_pixels: int | None = None) -> VisualGrid:
    """One image (or a video of `frames` frames, each one tile) of an NVILA-Lite-style tiled tower: every tile is
    `tile_tokens` visual tokens plus `tile_suffix` (the newline), and (tile / patch)^2 patches through the tower."""
    tiles = frames if frames else image_tiles(v, width, height, alone, max_tiles_for(v, max_pixels))
    return VisualGrid(width, height, tiles * (v.tile_tokens + v.tile_suffix), tiles * (v.tile // v.patch) ** 2)


def default_max_pixels(arch: Architecture) -> int | None:
    """The pixels one image is resized to at most when the spec sets no media.maxPixels: the family's token cap
    (`Family.image_tokens`) in pixels. None for tiled towers."""
    return pixels_for_tokens(arch, arch.image_tokens) if arch.image_tokens else None


def visual_tokens(arch: Architecture, width: int, height: int, max_pixels: int | None = None, alone: bool = True) -> int:
    """Visual tokens of one width x height image for an architecture, resized to at most `max_pixels` (default:
    the family's default cap); `alone`: the only image of its prompt (NVILA-Lite tiles only that one)."""
    v = vision_dims(arch.config)
    if v.kind == "nvila":
        return image_grid(v, width, height, alone=alone, max_pixels=max_pixels).tokens
    cap = max_pixels or default_max_pixels(arch)
    return visual_grid(v, min(width * height, cap) if cap else width * height).tokens
