"""Checkpoints of a supported architecture's real shape with random weights, written without a download (for
benchmarks and memory measurements)."""

from __future__ import annotations

from pathlib import Path

from vray.archs import registry
from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint, use_token_ids


def write_real_shaped_checkpoint(arch: registry.Architecture, folder: Path, text_layers: int | None = None,
                                  device: str = "cpu") -> Path:
    """A checkpoint of the architecture's real shape with random bf16 weights (no download), with the family's
    tiny tokenizer (its special tokens; ids inside the real vocabulary) and its image processor at the real
    resolution limits. For GPU benchmarks. `text_layers` keeps only the language model's first layers (the real
    widths and vocabulary, and the vision tower whole); `device` is where the random weights are drawn."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    processor = load_processor(tiny_checkpoint(arch.model_type))
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in processor.tokenizer.all_special_tokens}
    ip = processor.image_processor
    if arch.model_type == "internvl":
        ip.size, ip.crop_to_patches, ip.max_patches = {"height": 448, "width": 448}, True, 12
        processor.image_seq_length = 256
    else:
        factor = ip.patch_size * ip.merge_size
        ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}
    cfg = use_token_ids(arch.config, arch.model_type, ids)
    if text_layers is not None:
        text = dict(cfg.get("text_config", cfg))
        text["num_hidden_layers"] = text_layers
        if text.get("layer_types"):
            text["layer_types"] = text["layer_types"][:text_layers]
        cfg = {**cfg, "text_config": text} if "text_config" in cfg else text
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
