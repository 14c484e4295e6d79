"""Build vray/archs/configs/*.json (the shipped config.json of each checkpoint) from the reference table.

Run `python -m vray.archs.build_configs [PATH/TO/arch_configs.json]` after the reference changes; a test
checks that the shipped files are what this produces. Each file is the checkpoint's config.json in the
layout transformers reads, plus a `_vray` block with the source, the `verified` flag and every field
vray had to assume (with the reason).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vray.archs.registry import ARCHITECTURES, TRANSFORMERS_CLASSES, Architecture, config_filename

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "arch_configs.json"

# Keys copied verbatim from the reference text_config when present (everything else is derived below).
_TEXT_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "attn_output_gate", "mtp_num_hidden_layers", "attention_bias",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
)
_QWEN_VISION_KEYS = (
    "depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "spatial_merge_size",
    "temporal_patch_size", "out_hidden_size", "num_position_embeddings", "deepstack_visual_indexes",
    "hidden_act", "window_size", "fullatt_block_indexes", "tokens_per_second",
)

# NVILA-Lite-2B's language model config is unpublished: a Qwen2.5-1.5B-shaped language model is assumed
# (VILA's own scripts name the 2B recipe "qwen25_2B"; hidden 1536 is what SGLang's VILA config defaults to), so that
# planning still works. Every field but the width is labelled assumed; a real checkpoint's own text_config wins.
NVILA_ASSUMED_TEXT = {
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
NVILA_UNVERIFIED_TEXT = ("intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings")
# The reference table describes NVILA-Lite-2B in VILA's original layout; the -hf checkpoint holds the same weights.
REFERENCE_CHECKPOINT = {"Efficient-Large-Model/NVILA-Lite-2B-hf": "Efficient-Large-Model/NVILA-Lite-2B"}


def _reference_entry(reference: list[dict[str, Any]], arch: Architecture) -> dict[str, Any]:
    wanted = REFERENCE_CHECKPOINT.get(arch.repo_id, arch.repo_id)
    for entry in reference:
        if entry["checkpoint"] == wanted:
            return entry
    raise KeyError(f"{wanted} is not in the reference table")


def _present(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: d[k] for k in keys if d.get(k) is not None}


def _text_config(entry: dict[str, Any], arch: Architecture, assumed: dict[str, str]) -> dict[str, Any]:
    ref = entry["text_config"]
    text = _present(ref, _TEXT_KEYS)
    rope: dict[str, Any] = {"rope_type": "default"}
    if ref.get("rope_theta") is not None:
        rope["rope_theta"] = float(ref["rope_theta"])
    if arch.model_type in ("qwen3_5", "qwen3_5_moe"):
        rope["partial_rotary_factor"] = ref.get("partial_rotary_factor", 0.25)
        interval = ref.get("full_attention_interval", 4)
        text["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(text["num_hidden_layers"])
        ]
    if ref.get("mrope_section") is not None:
        rope["mrope_section"] = ref["mrope_section"]
    if ref.get("mrope_interleaved") is not None:
        rope["mrope_interleaved"] = ref["mrope_interleaved"]
    if arch.model_type == "qwen2_5_vl":
        text["attention_bias"] = bool(ref.get("attention_bias_qkv", True))
        if "head_dim" in text:  # derived (hidden / heads), not a config.json field for this family
            del text["head_dim"]
    if arch.model_type == "internvl":
        text["model_type"] = "qwen3"
        rope.pop("mrope_section", None)
    else:
        text["model_type"] = {
            "qwen3_5": "qwen3_5_text",
            "qwen3_5_moe": "qwen3_5_moe_text",
            "qwen3_vl": "qwen3_vl_text",
            "qwen3_vl_moe": "qwen3_vl_moe_text",
            "qwen2_5_vl": "qwen2_5_vl_text",
        }[arch.model_type]
    text["rope_parameters"] = rope

    # Fill what the reference left null with the value of the nearest verified sibling, and say so.
    if "vocab_size" not in text:
        text["vocab_size"] = 152064
        assumed["text_config.vocab_size"] = "not in the source excerpt; 152064 as in Qwen2.5-VL-7B/32B and the Qwen2.5-72B text model"
    if "tie_word_embeddings" not in text:
        text["tie_word_embeddings"] = False
        assumed["text_config.tie_word_embeddings"] = "not in the source; untied, as every >= 7B sibling of the family"
    if "max_position_embeddings" not in text:
        text["max_position_embeddings"] = 128000 if arch.model_type == "qwen2_5_vl" else 40960
        assumed["text_config.max_position_embeddings"] = "not in the source; the value of the family's other sizes"
    if "rope_theta" not in rope:
        rope["rope_theta"] = 1000000.0
        assumed["text_config.rope_parameters.rope_theta"] = "not in the source; the family's value (1e6)"
    return text


def _qwen_vision(entry: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    vision = _present(entry["vision_config"], _QWEN_VISION_KEYS)
    vision["model_type"] = {
        "qwen3_5": "qwen3_5_vision",
        "qwen3_5_moe": "qwen3_5_moe_vision",
        "qwen3_vl": "qwen3_vl_vision",
        "qwen3_vl_moe": "qwen3_vl_moe_vision",
        "qwen2_5_vl": "qwen2_5_vl_vision",
    }[arch.model_type]
    return vision


def _internvl_vision(entry: dict[str, Any]) -> dict[str, Any]:
    ref = entry["vision_config"]
    return {
        "model_type": "internvl_vision",
        "hidden_size": ref["hidden_size"],
        "num_hidden_layers": ref["depth"],
        "num_attention_heads": ref["num_heads"],
        "intermediate_size": ref["intermediate_size"],
        "image_size": [ref["image_size"], ref["image_size"]],
        "patch_size": [ref["patch_size"], ref["patch_size"]],
        "hidden_act": "gelu",
        "norm_type": "layer_norm",
        "use_qk_norm": False,
        "use_mean_pooling": True,
        "layer_scale_init_value": 0.1,
    }


def build_config(entry: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """The shipped config.json of one checkpoint, built from its reference entry."""
    assumed: dict[str, str] = {}
    if arch.model_type == "nvila_lite":
        cfg = _nvila_config(entry, assumed)
    else:
        text = _text_config(entry, arch, assumed)
        cfg = {
            "architectures": [TRANSFORMERS_CLASSES[arch.model_type]],
            "model_type": arch.model_type,
            "text_config": text,
            "tie_word_embeddings": text["tie_word_embeddings"],
        }
        if arch.model_type == "internvl":
            vision = _internvl_vision(entry)
            ref_v = entry["vision_config"]
            cfg.update(
                vision_config=vision,
                downsample_ratio=ref_v.get("downsample_ratio", 0.5),
                projector_hidden_act=ref_v.get("projector_hidden_act", "gelu"),
                image_seq_length=ref_v.get("image_seq_length", 256),
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
            )
            assumed["vision_config"] = (
                "the -HF config's vision block was not seen; InternViT-300M-448px-V2.5 dimensions "
                "(transformers' InternVLVisionConfig defaults, which match the published model tree)"
            )
            assumed["text_config"] = "the -HF config was not seen; the text block of the remote-code 8B config (same weights)"
        else:
            cfg["vision_config"] = _qwen_vision(entry, arch)
    cfg["_vray"] = {
        "checkpoint": arch.repo_id,
        "source": entry.get("source", ""),
        "verified": bool(entry.get("verified", False)),
        "verified_text_config": bool(entry.get("verified_text_config", False)),
        "verified_vision_config": bool(entry.get("verified_vision_config", False)),
        "safetensors_total_params": (entry.get("total_params") or {}).get("value"),
        "safetensors_total_params_what": (entry.get("total_params") or {}).get("what"),
        "base_model": entry.get("base_model"),
        "assumed": assumed,
        "notes": entry.get("notes", ""),
    }
    return cfg


def _nvila_config(entry: dict[str, Any], assumed: dict[str, str]) -> dict[str, Any]:
    """The config.json of NVILA-Lite's -hf checkpoint (model_type nvila_lite): `text_config`, `vision_config` and
    the placeholder token ids, the keys of its configuration class (SGLang's nvila_lite.py mirrors it)."""
    ref_v = entry["vision_config"]
    for key in NVILA_UNVERIFIED_TEXT:
        assumed[f"text_config.{key}"] = (
            "NVILA-Lite-2B's language-model config is unpublished; assumed Qwen2.5-1.5B's "
            f"({NVILA_ASSUMED_TEXT[key]})")
    text = dict(NVILA_ASSUMED_TEXT)
    return {
        "architectures": ["NVILALiteForConditionalGeneration"],
        "model_type": "nvila_lite",
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": ref_v["hidden_size"],
            "num_hidden_layers": ref_v["depth"],
            "num_attention_heads": ref_v["num_heads"],
            "intermediate_size": ref_v["intermediate_size"],
            "patch_size": ref_v["patch_size"],
            "image_size": ref_v["image_size"],
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-06,
            "vision_use_head": False,
        },
        "image_token_id": 151649,
        "video_token_id": 151650,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def build_all(reference_path: Path) -> dict[str, dict[str, Any]]:
    """File name -> config for every registry checkpoint."""
    reference = json.loads(Path(reference_path).read_text())
    return {config_filename(a.repo_id): build_config(_reference_entry(reference, a), a) for a in ARCHITECTURES}


def render(cfg: dict[str, Any]) -> str:
    """The exact text a shipped config file holds."""
    return json.dumps(cfg, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", nargs="?", default=str(DEFAULT_REFERENCE))
    args = parser.parse_args(argv)
    CONFIG_DIR.mkdir(parents=True, exist_ok=True)
    built = build_all(Path(args.reference))
    for name, cfg in built.items():
        (CONFIG_DIR / name).write_text(render(cfg))
    print(f"wrote {len(built)} configs to {CONFIG_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
