"""NVILA-Lite's processor: images cut into 448 px tiles, prompts with 121 placeholder tokens and a newline per tile.

- One image alone among its prompt's images (videos aside) is cut into a grid of 1 to `max_tiles` tiles (the grid closest to its aspect ratio,
  `vray.archs.vision.tile_grid`), plus a thumbnail of the whole image when the grid has more than one tile.
- Each image of a prompt with several images, and each video frame, is one tile (the image resized to 448 x 448).
- Every tile is `tile_tokens` placeholder tokens (121 = 11 x 11 after the projector's 3 x 3 downsample), then one
  newline token. The newline is set at the token level, so it never merges with the text that follows.

The counts are the ones `vray.archs.vision` gives the planner and the data check. Sources: the checkpoints'
`preprocessor_config.json` (SiglipImageProcessor, 448 x 448, bicubic, mean and std 0.5) and the processing that
SGLang and the published processor apply (sgl-project/sglang, python/sglang/srt/multimodal/processors/nvila.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from vray.archs.vision import NVILA_MAX_TILES, NVILA_MERGE, tile_grid, tile_tokens

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"


def _as_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first -> last
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


def _flat(values: Any) -> list[Any]:
    if values is None:
        return []
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)] if any(isinstance(v, (list, tuple)) for v in values) \
            else list(values)
    return [values]


class NVILALiteProcessor(ProcessorMixin):
    """Tokenizer plus SigLIP image processor, with NVILA-Lite's tiling and placeholder expansion."""

    attributes = ["image_processor", "tokenizer"]
    # The tile count of an image depends on how many images its whole prompt has: callers that process a prompt in
    # pieces pass `images_in_prompt` (vray's collator does).
    tiles_single_images = True

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 max_tiles: int = NVILA_MAX_TILES, **kwargs: Any):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.max_tiles = max_tiles
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.newline_token_id = tokenizer("\n", add_special_tokens=False)["input_ids"][0]

    @property
    def tile(self) -> int:
        size = self.image_processor.size
        return int(size["height"] if isinstance(size, dict) else size.height)

    @property
    def tile_tokens(self) -> int:
        """Placeholder tokens of one tile: the patch grid padded to a multiple of 3, merged 3 x 3."""
        return tile_tokens(self.tile, int(getattr(self.image_processor, "patch_size", 0) or 14), NVILA_MERGE)

    def tiles(self, image: Image.Image, alone: bool) -> list[Image.Image]:
        """The tiles of one image: a grid plus a thumbnail when it is alone in its prompt, else the image itself."""
        image = _as_image(image)
        if not alone:
            return [image]
        cols, rows = tile_grid(image.width, image.height, self.tile, self.max_tiles)
        if cols * rows == 1:
            return [image]
        side = self.tile
        resized = image.resize((side * cols, side * rows), Image.Resampling.BICUBIC)
        grid = [resized.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
                for r in range(rows) for c in range(cols)]
        return grid + [image.resize((side, side), Image.Resampling.BICUBIC)]

    def _pixels(self, tiles: list[Image.Image]) -> torch.Tensor:
        out = self.image_processor(images=tiles, return_tensors="pt")
        return out["pixel_values"]

    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, images_in_prompt: int | None = None,
                 return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Tokens and pixels of `text` (a string or a list) with its `images` and `videos` (each a list of frames), in
        placeholder order. `images_in_prompt`: how many images the whole prompt holds (default: those given)."""
        texts = [text] if isinstance(text, str) else list(text or [])
        image_list = _flat(images)
        frames = [[_as_image(f) for f in _flat(v)] for v in (videos or [])]
        n_images = sum(t.count(self.image_token) for t in texts)
        n_videos = sum(t.count(self.video_token) for t in texts)
        if n_images != len(image_list) or n_videos != len(frames):
            raise ValueError(f"the text has {n_images} {self.image_token} and {n_videos} {self.video_token} "
                             f"placeholders for {len(image_list)} images and {len(frames)} videos")
        if images_in_prompt is not None and len(texts) > 1:
            raise ValueError("images_in_prompt describes one prompt: pass one text with it")
        unit = self.tile_tokens + 1  # placeholders, then the newline
        images_left, videos_left = iter(image_list), iter(frames)
        expanded, tiles = [], []
        for t in texts:
            # Each text is its own prompt: its image is tiled when it is the only one (of the whole prompt, when
            # the caller processes it in pieces).
            alone = (t.count(self.image_token) if images_in_prompt is None else images_in_prompt) == 1
            out = []
            for i, piece in enumerate(t.split(self.image_token)):
                if i:
                    tiles.append(self.tiles(next(images_left), alone))
                    out.append(self.image_token * (unit * len(tiles[-1])))
                for j, chunk in enumerate(piece.split(self.video_token)):
                    if j:
                        out.append(self.video_token * (unit * len(next(videos_left))))
                    out.append(chunk)
            expanded.append("".join(out))
        # No truncation: a cut would split a tile's placeholders from its features.
        tok_kwargs = {k: v for k, v in kwargs.items() if k in ("padding", "padding_side")}
        encoded = self.tokenizer(expanded, add_special_tokens=False, **tok_kwargs)
        ids = [self._newlines(row) for row in encoded["input_ids"]]
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": encoded["attention_mask"]}
        if tiles:
            data["pixel_values"] = self._pixels([tile for image_tiles in tiles for tile in image_tiles])
        if frames:
            data["pixel_values_videos"] = self._pixels([f for video in frames for f in video])
        if return_tensors == "pt":
            data["input_ids"] = torch.tensor(data["input_ids"], dtype=torch.long)
            data["attention_mask"] = torch.tensor(data["attention_mask"], dtype=torch.long)
        return BatchFeature(data=data, tensor_type=None)

    def _newlines(self, row: list[int]) -> list[int]:
        """Every `tile_tokens + 1`-th token of a run of placeholders becomes the newline that closes its tile."""
        out = list(row)
        unit = self.tile_tokens + 1
        run, kind = 0, None
        for i, t in enumerate(out):
            if t in (self.image_token_id, self.video_token_id):
                if t != kind:
                    run, kind = 0, t
                run += 1
                if run % unit == 0:
                    out[i] = self.newline_token_id
            else:
                run, kind = 0, None
        return out

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos"]
