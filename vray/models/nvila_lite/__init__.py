"""NVILA-Lite, implemented in vray from transformers' Qwen2 and SigLIP (no remote code).

Importing this package registers it with transformers' Auto classes under the model types `nvila_lite` (the
`-hf` checkpoints) and `vila` (the `-hf-preview` ones): `AutoConfig`, `AutoModelForImageTextToText`, `AutoModel`
and `AutoProcessor` then load either layout with `trust_remote_code=False`.
"""

from __future__ import annotations

from vray.models.nvila_lite.configuration_nvila_lite import NVILALiteConfig, VILAConfig
from vray.models.nvila_lite.modeling_nvila_lite import NVILALiteForConditionalGeneration, VILAForConditionalGeneration
from vray.models.nvila_lite.processing_nvila_lite import NVILALiteProcessor

__all__ = ["NVILALiteConfig", "VILAConfig", "NVILALiteForConditionalGeneration", "VILAForConditionalGeneration",
           "NVILALiteProcessor", "register"]


# The -hf checkpoints keep SigLIP's `vision_model.` level inside the tower (`vision_tower.vision_model.*`), which
# transformers' SiglipVisionModel no longer has: the key is renamed on load and renamed back on every save
# (save_pretrained, and vray's writers through `revert_weight_conversion`), whichever way the model was built.
TOWER_RENAMING = (r"^vision_tower\.vision_model\.", "vision_tower.")


def register() -> None:
    """Register both model types with transformers' Auto classes, and the tower's key renaming (once; later calls
    do nothing)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    for config, model in ((NVILALiteConfig, NVILALiteForConditionalGeneration),
                          (VILAConfig, VILAForConditionalGeneration)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoProcessor.register(config, NVILALiteProcessor, exist_ok=True)
        # By model type too: FSDP2 renames the class of a module it shards (FSDPNVILALite...).
        for key in (model.__name__, config.model_type):
            register_checkpoint_conversion_mapping(key, [WeightRenaming(*TOWER_RENAMING)], overwrite=True)


register()
