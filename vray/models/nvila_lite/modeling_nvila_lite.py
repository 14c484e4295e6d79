"""NVILA-Lite as a transformers model: SigLIP tiles -> 3x3 downsample projector -> Qwen2 language model.

The module tree follows the Hugging Face checkpoints' weight keys (SGLang's native `nvila_lite.py` loads the same
names): `vision_tower.vision_model.*` (transformers' `SiglipVisionModel`, which renames its `vision_model.` prefix on
load and puts it back on save), `mm_projector.layers.{1,2,4,5,7}.*` (LayerNorm, Linear, LayerNorm, Linear, Linear; 0
is the parameter-free downsample, 3 and 6 the GELUs) and `llm.*` (transformers' `Qwen2ForCausalLM`).

Each tile's features are the tower's second-to-last hidden state, every one of its 32 x 32 patches: the tower is
built without the layers after that one (and without its final LayerNorm), which would never run; their weights in
a checkpoint are ignored on load. The projector zero-pads the grid to 33 x 33, concatenates each 3 x 3 block into
9 x 1152 channels (121 tokens a tile) and maps them to the language model's width. The features replace the image
(or video) placeholder tokens of the prompt in order; the newline after each tile is an ordinary text token.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2ForCausalLM, SiglipVisionModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vray.models.nvila_lite.configuration_nvila_lite import NVILALiteConfig, VILAConfig

MERGE = 3  # the projector's downsample: 3 x 3 patches become one token


class NVILALiteDownsample(nn.Module):
    """[tiles, side*side, C] -> [tiles, ceil(side/3)^2, 9C]: the grid zero-padded at the bottom and right to a
    multiple of 3, each 3 x 3 block's features concatenated (row by row within the block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, channels = x.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"NVILA-Lite's projector needs a square patch grid; got {tokens} patches a tile")
        grid = x.reshape(tiles, side, side, channels)
        pad = (MERGE - side % MERGE) % MERGE
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))
        n = (side + pad) // MERGE
        grid = grid.reshape(tiles, n, MERGE, n, MERGE, channels).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(tiles, n * n, MERGE * MERGE * channels)


class NVILALiteProjector(nn.Module):
    """`mm_projector`: downsample, then LayerNorm -> Linear(9C, 3C) -> GELU -> LayerNorm -> Linear(3C, H) -> GELU ->
    Linear(H, H), with C the tower's width and H the language model's."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        wide = MERGE * MERGE * vision_hidden
        self.layers = nn.Sequential(
            NVILALiteDownsample(),
            nn.LayerNorm(wide), nn.Linear(wide, 3 * vision_hidden), nn.GELU(),
            nn.LayerNorm(3 * vision_hidden), nn.Linear(3 * vision_hidden, text_hidden), nn.GELU(),
            nn.Linear(text_hidden, text_hidden),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class NVILALitePreTrainedModel(PreTrainedModel):
    config: NVILALiteConfig
    config_class = NVILALiteConfig
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]


def tower_config(config: NVILALiteConfig) -> Any:
    """The vision tower as NVILA-Lite runs it: its layers up to the feature layer, no pooling head."""
    vision = copy.deepcopy(config.vision_config)
    vision.num_hidden_layers = config.vision_config.num_hidden_layers + 1 + config.feature_layer
    vision.vision_use_head = False
    return vision


class NVILALiteForConditionalGeneration(NVILALitePreTrainedModel, GenerationMixin):
    """NVILA-Lite for training and generation (`AutoModelForImageTextToText`)."""

    def __init__(self, config: NVILALiteConfig):
        super().__init__(config)
        vision = tower_config(config)
        if vision.num_hidden_layers < 1:
            raise ValueError(f"config.json: the feature layer {config.feature_layer} leaves no vision layer to run")
        self.vision_tower = SiglipVisionModel(vision)
        self.vision_tower.post_layernorm = nn.Identity()  # the feature layer's output is read before any final norm
        self.mm_projector = NVILALiteProjector(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.llm = Qwen2ForCausalLM(config.text_config)
        unused = "|".join(str(i) for i in range(vision.num_hidden_layers, config.vision_config.num_hidden_layers))
        # Reported after the tower's `vision_model.` prefix is renamed away (and before, by other loaders).
        self._keys_to_ignore_on_load_unexpected = [r"vision_tower\.(vision_model\.)?(post_layernorm|head)\."] + (
            [rf"vision_tower\.(vision_model\.)?encoder\.layers\.({unused})\."] if unused else [])
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.llm.model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, S, S] pixels -> [tiles * tokens_per_tile, H] language-model embeddings, tile after tile."""
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        features = self.vision_tower(pixel_values=pixel_values.to(dtype)).last_hidden_state
        projected = self.mm_projector(features)
        return projected.reshape(-1, projected.shape[-1])

    def _merge(self, input_ids: torch.Tensor, embeds: torch.Tensor, pixels: torch.Tensor | None,
               token_id: int, what: str) -> torch.Tensor:
        mask = input_ids == token_id
        placeholders = int(mask.sum())
        if pixels is None:
            if placeholders:
                raise ValueError(f"the prompt has {placeholders} {what} placeholder tokens but no {what} pixels")
            return embeds
        features = self.get_image_features(pixels)
        if features.shape[0] != placeholders:
            raise ValueError(f"the prompt has {placeholders} {what} placeholder tokens for {features.shape[0]} {what} "
                             "features; let the processor expand the placeholders (121 a tile)")
        return embeds.masked_scatter(mask[..., None].expand_as(embeds), features.to(embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            inputs_embeds = self._merge(input_ids, inputs_embeds, pixel_values, self.config.image_token_id, "image")
            inputs_embeds = self._merge(input_ids, inputs_embeds, pixel_values_videos, self.config.video_token_id,
                                        "video")
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)


class VILAForConditionalGeneration(NVILALiteForConditionalGeneration):
    """The same model for the `-hf-preview` layout's config (model_type `vila`)."""

    config_class = VILAConfig
