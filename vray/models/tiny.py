"""Tiny real-architecture checkpoints (`tiny:<family>`), written to disk and loaded like hub checkpoints.

Each is the registry's real config of a reference checkpoint, shrunk to a few hundred thousand parameters
(same model_type, layer types, rotary layout, DeepStack / window / MoE structure), with random safetensors
weights, a byte-level BPE tokenizer trained on the fly that has the family's special tokens, a chat
template, and the family's image and video processors. `AutoModelForImageTextToText.from_pretrained` and
`AutoProcessor.from_pretrained` load the folder exactly as they load a download.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vray.archs import registry
from vray.errors import VrayError
from vray.models.cache import cache_root
from vray.models.tiny_tokenizer import build_tokenizer, corpus

TINY_FORMAT_VERSION = 2
# The registry checkpoint each tiny family is shrunk from.
REFERENCE = {
    "qwen2_5_vl": ("qwen2.5vl", "3B"),
    "qwen3_vl": ("qwen3vl", "2B"),
    "qwen3_vl_moe": ("qwen3vl", "30B-A3B"),
    "qwen3_5": ("qwen3.5", "0.8B"),
    "qwen3_5_moe": ("qwen3.5", "35B-A3B"),
    "internvl": ("internvl3.5", "8B"),
    "nvila_lite": ("nvila-lite", "2B"),
}
FAMILIES = tuple(REFERENCE)

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
_VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64)
TINY_INIT_RANGE = 0.1
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _shrink_text(text: dict[str, Any], family: str, vocab_size: int) -> dict[str, Any]:
    t = dict(text)
    t.update(_TEXT, vocab_size=vocab_size)
    rope = dict(t.get("rope_parameters") or {})
    if family.startswith("qwen3_5"):
        # 3 Gated DeltaNet layers then 1 gated-attention layer, as the real 3:1 pattern.
        t.update(num_hidden_layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)
        t["layer_types"] = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
        rope["mrope_section"] = [2, 1, 1]  # partial rotary: 32 * 0.25 / 2 = 4 frequencies
        if family == "qwen3_5_moe":
            t.update(_MOE, shared_expert_intermediate_size=32)
    elif family.startswith("qwen3_vl"):
        rope["mrope_section"] = [4, 2, 2]
        if family == "qwen3_vl_moe":
            t.update(_MOE)
    elif family in ("qwen2_5_vl", "nvila_lite"):
        t.pop("head_dim", None)
        if family == "qwen2_5_vl":
            rope["mrope_section"] = [2, 3, 3]
    t.pop("mtp_num_hidden_layers", None)
    if rope:
        t["rope_parameters"] = rope
    return t


def tiny_config(family: str, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """The config.json of a tiny checkpoint of `family`."""
    arch = registry.get(*REFERENCE[family])
    cfg = copy.deepcopy(arch.config)
    cfg["text_config"] = _shrink_text(cfg["text_config"], family, vocab_size)
    if family == "internvl":
        v = cfg["vision_config"]
        v.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 image_size=[112, 112], patch_size=[14, 14])
        cfg.update(image_seq_length=16)
        cfg["text_config"]["tie_word_embeddings"] = False
    elif family == "nvila_lite":
        # Real 448 px tiles and 14 px patches (121 tokens a tile, as at full size); three layers, of which the
        # model runs two (the features are the second-to-last layer's output).
        cfg["vision_config"].update(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    else:
        v = cfg["vision_config"]
        v.update(_VISION, out_hidden_size=_TEXT["hidden_size"])
        if "deepstack_visual_indexes" in v and v["deepstack_visual_indexes"]:
            v["deepstack_visual_indexes"] = [0]
        if family == "qwen2_5_vl":
            v.update(fullatt_block_indexes=[1], window_size=112)
        if "num_position_embeddings" in v:
            v["num_position_embeddings"] = 64
    cfg["tie_word_embeddings"] = cfg["text_config"].get("tie_word_embeddings", False)
    # A wider initialisation than the real 0.02: with 64-wide hidden states and a frozen RMSNorm, 0.02-scale
    # embeddings cap the logits near 1, and a LoRA adapter on a random base could never become confident.
    cfg["initializer_range"] = cfg["text_config"]["initializer_range"] = TINY_INIT_RANGE
    return use_token_ids(cfg, family, token_ids)


def use_token_ids(cfg: dict[str, Any], family: str, token_ids: dict[str, int]) -> dict[str, Any]:
    """Point a config's special-token ids at a tokenizer's (image, video, vision start / end, eos, pad)."""
    if family == "internvl":
        cfg["image_token_id"] = token_ids["<IMG_CONTEXT>"]
    elif family == "nvila_lite":
        cfg.update(image_token_id=token_ids["<image>"], video_token_id=token_ids["<vila/video>"])
    else:
        cfg.update(
            image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"],
            vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"],
        )
    cfg["text_config"]["eos_token_id"] = token_ids["<|im_end|>"]
    cfg["text_config"]["pad_token_id"] = token_ids["[PAD]" if family == "nvila_lite" else "<|endoftext|>"]
    cfg["text_config"]["bos_token_id"] = token_ids["<|endoftext|>"]
    return cfg


def _image_processor(family: str) -> Any:
    if family == "nvila_lite":
        from transformers import SiglipImageProcessor

        # The published preprocessor_config.json: 448 x 448 tiles, bicubic, mean and std 0.5.
        return SiglipImageProcessor(size={"height": 448, "width": 448}, resample=3, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, do_convert_rgb=None)
    if family == "internvl":
        from transformers import GotOcr2ImageProcessor

        return GotOcr2ImageProcessor(size={"height": 112, "width": 112}, crop_to_patches=False, max_patches=1,
                                     min_patches=1, do_normalize=True)
    from transformers import Qwen2VLImageProcessor

    patch = 14 if family == "qwen2_5_vl" else 16
    factor = patch * 2
    # Small images stay small: a 112-128 px image becomes 16 visual tokens.
    return Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * 64},
        patch_size=patch, merge_size=2, temporal_patch_size=2,
    )


def _video_processor(family: str) -> Any:
    if family == "internvl":
        from transformers import InternVLVideoProcessor

        return InternVLVideoProcessor(size={"height": 112, "width": 112})
    if family == "qwen2_5_vl":
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64},
                                     patch_size=14, merge_size=2, temporal_patch_size=2)
    from transformers import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
                                 patch_size=16, merge_size=2, temporal_patch_size=2)


def _processor(family: str, tokenizer: Any) -> Any:
    from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

    if family == "nvila_lite":
        from vray.models.nvila_lite import NVILALiteProcessor

        return NVILALiteProcessor(_image_processor(family), tokenizer, chat_template=tokenizer.chat_template)
    image, video = _image_processor(family), _video_processor(family)
    if family == "internvl":
        return InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                 image_seq_length=16, chat_template=tokenizer.chat_template)
    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen3VLProcessor
    return cls(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=tokenizer.chat_template)


def _cache_key(family: str) -> str:
    import transformers

    blob = json.dumps([family, TINY_FORMAT_VERSION, transformers.__version__, registry.get(*REFERENCE[family]).config,
                       corpus()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def write_tiny_checkpoint(family: str, folder: Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write a tiny `family` checkpoint (config, safetensors, tokenizer, processor) into `folder`; `vocab_size` gives
    it a larger vocabulary than its tokenizer's (a real one, so that the logits weigh what they do at real size)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from vray.models import register_families

    register_families()
    tokenizer = build_tokenizer(family, corpus())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    cfg = tiny_config(family, vocab_size=max(vocab_size or 0, len(tokenizer)), token_ids=ids)
    cfg.pop("_vray", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False, max_new_tokens=32
    )
    folder.mkdir(parents=True, exist_ok=True)
    # Not model.save_pretrained: inside a torch.distributed worker it writes on rank 0 only, and any worker
    # of a run may be the first to need the checkpoint.
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    if family == "nvila_lite":
        _write_published_nvila(model, folder, _processor(family, tokenizer))
    else:
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        _processor(family, tokenizer).save_pretrained(folder)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).exists()]
    if missing:
        raise RuntimeError(f"writing tiny:{family} left out {missing}")
    (folder / "vray_tiny.json").write_text(json.dumps({"family": family, "reference": "%s:%s" % REFERENCE[family],
                                                       "format": TINY_FORMAT_VERSION}) + "\n")
    return folder


# NVILA-Lite-2B-hf's files, as published: the processor files are read off the hub (processor_config.json,
# preprocessor_config.json); config.json's auto_map names the checkpoint's remote-code modules, which vray never runs.
NVILA_AUTO_MAP = {
    "AutoConfig": "configuration_nvila_lite.NVILALiteConfig",
    "AutoModel": "modeling_nvila_lite.NVILALiteForConditionalGeneration",
    "AutoProcessor": "processing_nvila_lite.NVILALiteProcessor",
}


def _write_published_nvila(model: Any, folder: Path, processor: Any) -> None:
    """The NVILA-Lite checkpoint in the -hf repos' layout: their weight keys (`vision_tower.vision_model.*`, the
    tower's unused last layer and final LayerNorm included, no separate tied LM head), config.json with its
    auto_map, and the processor as preprocessor_config.json plus processor_config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionModel
    from transformers.core_model_loading import revert_weight_conversion

    tied = set(model.all_tied_weights_keys)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in tied}
    state = revert_weight_conversion(model, state)
    # What a published tower holds beyond the layers vray runs: its last layer and final LayerNorm (random here).
    full = SiglipVisionModel(model.config.vision_config)
    last = model.config.vision_config.num_hidden_layers - 1
    for k, v in full.state_dict().items():
        if k.startswith((f"encoder.layers.{last}.", "post_layernorm.")):
            state[f"vision_tower.vision_model.{k}"] = v.to(torch.float32).clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = NVILA_AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    image = processor.image_processor.to_dict()
    image.update(image_processor_type="SiglipImageProcessor", processor_class="NVILALiteProcessor",
                 auto_map={"AutoProcessor": NVILA_AUTO_MAP["AutoProcessor"]})
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (folder / "processor_config.json").write_text(json.dumps(
        {"auto_map": {"AutoProcessor": NVILA_AUTO_MAP["AutoProcessor"]}, "processor_class": "NVILALiteProcessor"},
        indent=2) + "\n")


def tiny_checkpoint(family: str, root: Path | None = None) -> Path:
    """The folder of the `tiny:<family>` checkpoint, written on first use into the cache."""
    if family not in REFERENCE:
        raise VrayError(f"model.source: 'tiny:{family}' is not a tiny family; choose one of {', '.join(FAMILIES)}")
    base = (root or cache_root()) / "tiny"
    folder = base / f"{family}-{_cache_key(family)}"
    if (folder / "vray_tiny.json").exists():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=base))
    try:
        write_tiny_checkpoint(family, tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "vray_tiny.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

