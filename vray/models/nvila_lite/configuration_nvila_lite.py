"""NVILA-Lite's configuration: a Qwen2 language model, a SigLIP vision tower and the token ids of the image and video
placeholders, in the schema of the Hugging Face checkpoints.

- `NVILALiteConfig` (model_type `nvila_lite`): `Efficient-Large-Model/NVILA-Lite-2B-hf`. Its keys are `text_config`,
  `vision_config`, `image_token_id` and `video_token_id`; the projector (3x3 downsample MLP) and the feature layer
  (the tower's second-to-last hidden state) are fixed by the architecture, not configured.
- `VILAConfig` (model_type `vila`): the `-hf-preview` checkpoints, which also spell out `mm_projector_type`,
  `mm_vision_select_layer`, `mm_vision_select_feature`, `mm_hidden_size` and `hidden_size`. vray reads the ones that
  NVILA-Lite defines and refuses any other projector or feature choice by name.

Sources for the schema: SGLang's native `nvila_lite.py` and `vila.py` model files (sgl-project/sglang,
python/sglang/srt/models/), which mirror the checkpoints' own configuration classes.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig, Qwen2Config, SiglipVisionConfig

# The placeholder ids of VILA's tokenizer (Qwen2's vocabulary plus VILA's tokens): `<image>` and `<vila/video>`.
IMAGE_TOKEN_ID = 151649
VIDEO_TOKEN_ID = 151650
FEATURE_LAYER = -2  # the vision tower's hidden state the projector reads: the input of its last layer
PROJECTOR = "mlp_downsample_3x3_fix"


def _sub_config(value: Any, default: type[PretrainedConfig]) -> PretrainedConfig:
    if value is None:
        return default()
    if isinstance(value, PretrainedConfig):
        return value
    values = dict(value)
    model_type = values.pop("model_type", default.model_type)
    return AutoConfig.for_model(model_type, **values) if model_type != default.model_type else default(**values)


class NVILALiteConfig(PretrainedConfig):
    """NVILA-Lite: Qwen2 `text_config`, SigLIP `vision_config`, and the image / video placeholder token ids."""

    model_type = "nvila_lite"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(self, text_config: Any = None, vision_config: Any = None, image_token_id: int = IMAGE_TOKEN_ID,
                 video_token_id: int = VIDEO_TOKEN_ID, **kwargs: Any):
        self.text_config = _sub_config(text_config, Qwen2Config)
        self.vision_config = _sub_config(vision_config, SiglipVisionConfig)
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def feature_layer(self) -> int:
        """The vision tower's hidden state the projector reads (-2: the output of its second-to-last layer)."""
        return FEATURE_LAYER


class VILAConfig(NVILALiteConfig):
    """The `-hf-preview` layout of NVILA-Lite (model_type `vila`): the same model, with its projector and feature
    layer written out."""

    model_type = "vila"

    def __init__(self, text_config: Any = None, vision_config: Any = None, image_token_id: int = IMAGE_TOKEN_ID,
                 video_token_id: int = VIDEO_TOKEN_ID, mm_projector_type: str = PROJECTOR,
                 mm_vision_select_layer: int = FEATURE_LAYER, mm_vision_select_feature: str = "cls_patch",
                 **kwargs: Any):
        if mm_projector_type != PROJECTOR:
            raise ValueError(f"config.json: mm_projector_type {mm_projector_type!r} is not NVILA-Lite's "
                             f"({PROJECTOR!r}); vray implements NVILA-Lite only")
        if mm_vision_select_feature not in ("cls_patch", "patch"):
            raise ValueError(f"config.json: mm_vision_select_feature {mm_vision_select_feature!r} is not supported; "
                             "NVILA-Lite reads every token of the tower ('cls_patch')")
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        super().__init__(text_config, vision_config, image_token_id, video_token_id, **kwargs)

    @property
    def feature_layer(self) -> int:
        return int(self.mm_vision_select_layer)
