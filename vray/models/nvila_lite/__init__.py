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


def register() -> None:
    """Register both model types with transformers' Auto classes (once; later calls do nothing)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    for config, model in ((NVILALiteConfig, NVILALiteForConditionalGeneration),
                          (VILAConfig, VILAForConditionalGeneration)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoProcessor.register(config, NVILALiteProcessor, exist_ok=True)


register()
