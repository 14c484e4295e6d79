"""The 21 supported checkpoints over seven architectures, and what vray needs to know of each."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from vray.errors import VrayError

# Box conventions (implemented in vray.data.boxes): how a family writes boxes in its answers.
BOX_QWEN25_ABS = "qwen2.5vl-abs-resized"  # absolute pixels of the processor-resized image
BOX_QWEN3_REL1000 = "qwen3-rel1000"  # integers on a 0-1000 grid of the image
BOX_INTERNVL_REL1000 = "internvl-rel1000"  # <ref>..</ref><box>[[..]]</box>, 0-1000 grid
BOX_NVILA_REL1 = "nvila-rel1"  # LLaVA/VILA style: fractions of width and height, 0-1

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Gated DeltaNet projections; in_proj_a / in_proj_b output one value per head (16-48), too narrow for a rank-16 adapter.
_DELTANET = ("in_proj_qkv", "in_proj_z", "out_proj")
_SHARED_EXPERT = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")


@dataclass(frozen=True)
class Family:
    """What is common to the checkpoints of one architecture name."""

    name: str
    display: str
    sizes: tuple[str, ...]
    recommended_size: str
    box_convention: str
    lora_supported: bool
    language_model_prefix: str
    vision_modules: tuple[str, ...]
    projector_modules: tuple[str, ...]
    notes: str = ""
    # Visual tokens one image is resized to at most when the spec sets no media.maxPixels (dynamic-resolution
    # towers). The top of the 256-1280 token range Qwen's model cards recommend; the checkpoints' own
    # preprocessor configs allow 16384. None: the family tiles images, and its tiling bounds the count.
    image_tokens: int | None = None


@dataclass(frozen=True)
class LoraSelection:
    """Which Linear modules LoRA adapts: the language model's target projections (a regex over full module names),
    plus every Linear under the prefixes of the other parts in scope (projector, vision tower). The loader, the
    memory model and the parameter counts all ask this one rule."""

    regex: str
    prefixes: tuple[str, ...] = ()

    def adapts(self, name: str) -> bool:
        """Whether the Linear module `name` (its full name in the model) gets an adapter."""
        return re.fullmatch(self.regex, name) is not None or name.startswith(tuple(p + "." for p in self.prefixes))


def lora_selection(regex: str, scope: tuple[str, ...] | list[str], projector_prefixes: tuple[str, ...],
                   vision_prefixes: tuple[str, ...]) -> LoraSelection:
    """The selection for a target regex and a `lora.scope`."""
    prefixes = (projector_prefixes if "projector" in scope else ()) + (vision_prefixes if "vision" in scope else ())
    return LoraSelection(regex, tuple(prefixes))


@dataclass(frozen=True)
class Architecture:
    """One supported checkpoint: where it lives, how transformers builds it, how vray adapts it."""

    name: str
    size: str
    repo_id: str
    model_type: str
    transformers_class: str
    min_transformers: str
    lora_supported: bool
    lora_targets: tuple[str, ...]
    language_model_prefix: str
    vision_modules: tuple[str, ...]
    projector_modules: tuple[str, ...]
    box_convention: str
    image_tokens: int | None = None  # the family's default visual-token cap per image (`Family.image_tokens`)
    is_moe: bool = False
    gated: bool = False
    recommended: bool = False
    notes: str = ""
    display: str = ""
    _extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def key(self) -> str:
        """`name:size`, how the CLI and messages name a checkpoint."""
        return f"{self.name}:{self.size}"

    @property
    def native(self) -> bool:
        """True when vray loads the architecture without remote code: transformers' own class, or vray's
        (`vray/models/<family>/`)."""
        return self.model_type in TRANSFORMERS_CLASSES

    @property
    def implemented_by_vray(self) -> bool:
        """True for an architecture vray implements itself (`vray/models/<family>/`): transformers runs it once vray
        registered it, engines outside vray (vLLM) have no class for it."""
        return self.transformers_class.startswith("vray.")

    @property
    def config(self) -> dict[str, Any]:
        """The checkpoint's config.json as shipped with vray (without vray's `_vray` notes)."""
        cfg = dict(_shipped_config(self.repo_id))
        cfg.pop("_vray", None)
        return cfg

    @property
    def provenance(self) -> dict[str, Any]:
        """Source, verification flag and assumed fields of the shipped config."""
        return dict(_shipped_config(self.repo_id).get("_vray", {}))

    @property
    def verified(self) -> bool:
        """Whether the shipped config values were checked against a copy of the real file."""
        return bool(self.provenance.get("verified", False))

    @property
    def assumed(self) -> dict[str, str]:
        """Config fields that are assumptions (field path -> why), empty when none."""
        return dict(self.provenance.get("assumed", {}))

    @property
    def context_length(self) -> int:
        """The language model's context (max_position_embeddings; 32768 when the config does not say)."""
        cfg = self.config
        text = cfg.get("text_config") or cfg
        return int(text.get("max_position_embeddings") or 32768)

    def lora_selection(self, targets: tuple[str, ...] | list[str] | None = None,
                       scope: tuple[str, ...] | list[str] = ("language",)) -> LoraSelection:
        """The Linear modules LoRA adapts for `lora.targets` and `lora.scope`."""
        return lora_selection(self.lora_target_regex(targets), scope, self.projector_modules, self.vision_modules)

    def lora_target_regex(self, targets: tuple[str, ...] | list[str] | None = None) -> str:
        """A peft `target_modules` regex that adapts the named projections inside the language model only."""
        names = tuple(targets) if targets else self.lora_targets
        if not names:
            raise VrayError(f"{self.key} has no LoRA targets: {self.name} supports full fine-tuning only")
        alternatives = "|".join(re.escape(n) for n in names)
        prefix = re.escape(self.language_model_prefix)
        return rf"{prefix}\.layers\.\d+\.(?:.*\.)?(?:{alternatives})"


# The class `AutoModelForImageTextToText` resolves a checkpoint to, per model_type: transformers' own, or vray's
# (registered with the Auto classes by `vray.models.register_families`).
TRANSFORMERS_CLASSES = {
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "nvila_lite": "vray.models.nvila_lite.NVILALiteForConditionalGeneration",
}
MIN_TRANSFORMERS = {
    "qwen3_5": "5.2.0",
    "qwen3_5_moe": "5.2.0",
    "qwen3_vl": "4.57.1",
    "qwen3_vl_moe": "4.57.1",
    "qwen2_5_vl": "4.49.0",
    "internvl": "4.52.1",
    "nvila_lite": "5.2.0",  # vray's class, on transformers' Qwen2 and SigLIP (vray's own lower bound)
}

_QWEN_VISION = ("model.visual",)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "qwen3.5", "Qwen3.5", ("0.8B", "2B", "4B", "9B", "27B", "35B-A3B"), "4B", BOX_QWEN3_REL1000, True,
            "model.language_model", _QWEN_VISION, ("model.visual.merger",),
            "hybrid Gated DeltaNet + gated attention (3:1); post-trained Qwen/Qwen3.5-{size} line", 1280,
        ),
        Family(
            "qwen3vl", "Qwen3-VL", ("2B", "4B", "8B", "32B", "30B-A3B", "235B-A22B"), "4B", BOX_QWEN3_REL1000, True,
            "model.language_model", _QWEN_VISION, ("model.visual.merger", "model.visual.deepstack_merger_list"),
            "*-Instruct line only; DeepStack", 1280,
        ),
        Family(
            "qwen2.5vl", "Qwen2.5-VL", ("3B", "7B", "32B", "72B"), "7B", BOX_QWEN25_ABS, True,
            "model.language_model", _QWEN_VISION, ("model.visual.merger",),
            "*-Instruct line only; absolute-pixel boxes", 1280,
        ),
        Family(
            "nvila-lite", "NVILA-Lite", ("2B",), "2B", BOX_NVILA_REL1, False,
            "llm.model", ("vision_tower",), ("mm_projector",),
            "vray's own implementation (no remote code); full fine-tuning only; language-model dimensions "
            "unpublished (assumed Qwen2.5-1.5B, labelled)",
        ),
        Family(
            "cosmos-reason1", "Cosmos-Reason1", ("7B",), "7B", BOX_QWEN25_ABS, True,
            "model.language_model", _QWEN_VISION, ("model.visual.merger",),
            "Qwen2.5-VL architecture; reasoning traces", 1280,
        ),
        Family(
            "cosmos-reason2", "Cosmos-Reason2", ("2B", "8B"), "2B", BOX_QWEN3_REL1000, True,
            "model.language_model", _QWEN_VISION, ("model.visual.merger", "model.visual.deepstack_merger_list"),
            "Qwen3-VL architecture; physical reasoning, CoT; gated on the hub (needs HF_TOKEN)", 1280,
        ),
        Family(
            "internvl3.5", "InternVL3.5", ("8B",), "8B", BOX_INTERNVL_REL1000, True,
            "model.language_model", ("model.vision_tower",), ("model.multi_modal_projector",),
            "transformers-native -HF checkpoint; pixel-shuffle projector",
        ),
    )
}


def _repo_id(family: str, size: str) -> str:
    return {
        "qwen3.5": f"Qwen/Qwen3.5-{size}",
        "qwen3vl": f"Qwen/Qwen3-VL-{size}-Instruct",
        "qwen2.5vl": f"Qwen/Qwen2.5-VL-{size}-Instruct",
        "nvila-lite": f"Efficient-Large-Model/NVILA-Lite-{size}-hf",
        "cosmos-reason1": f"nvidia/Cosmos-Reason1-{size}",
        "cosmos-reason2": f"nvidia/Cosmos-Reason2-{size}",
        "internvl3.5": f"OpenGVLab/InternVL3_5-{size}-HF",
    }[family]


def _model_type(family: str, size: str) -> str:
    moe = "-A" in size
    return {
        "qwen3.5": "qwen3_5_moe" if moe else "qwen3_5",
        "qwen3vl": "qwen3_vl_moe" if moe else "qwen3_vl",
        "qwen2.5vl": "qwen2_5_vl",
        "nvila-lite": "nvila_lite",
        "cosmos-reason1": "qwen2_5_vl",
        "cosmos-reason2": "qwen3_vl",
        "internvl3.5": "internvl",
    }[family]


def _lora_targets(model_type: str) -> tuple[str, ...]:
    return {
        "qwen3_5": _ATTN + _DELTANET + _MLP,
        # Routed experts are fused 3-D parameters, not Linear modules: attention and the shared expert by default.
        "qwen3_5_moe": _ATTN + _DELTANET + _SHARED_EXPERT,
        "qwen3_vl": _ATTN + _MLP,
        "qwen3_vl_moe": _ATTN,
        "qwen2_5_vl": _ATTN + _MLP,
        "internvl": _ATTN + _MLP,
        "nvila_lite": (),
    }[model_type]


def _build(family: Family, size: str) -> Architecture:
    model_type = _model_type(family.name, size)
    return Architecture(
        name=family.name,
        size=size,
        repo_id=_repo_id(family.name, size),
        model_type=model_type,
        transformers_class=TRANSFORMERS_CLASSES[model_type],
        min_transformers=MIN_TRANSFORMERS[model_type],
        lora_supported=family.lora_supported,
        lora_targets=_lora_targets(model_type) if family.lora_supported else (),
        language_model_prefix=family.language_model_prefix,
        vision_modules=family.vision_modules,
        projector_modules=family.projector_modules,
        box_convention=family.box_convention,
        image_tokens=family.image_tokens,
        is_moe=model_type.endswith("_moe"),
        gated=family.name == "cosmos-reason2",
        recommended=size == family.recommended_size,
        notes=family.notes,
        display=f"{family.display} {size}",
    )


ARCHITECTURES: tuple[Architecture, ...] = tuple(_build(f, s) for f in FAMILIES.values() for s in f.sizes)


def architecture_names() -> list[str]:
    """The architecture names a spec may use."""
    return list(FAMILIES)


def sizes_of(name: str) -> list[str]:
    """The sizes of one architecture name."""
    return list(FAMILIES[name].sizes)


def suggest(value: str, choices: list[str]) -> str:
    """' (did you mean X?)' when a close choice exists, else ''."""
    norm = {c.lower().replace("-", "").replace("_", "").replace(".", ""): c for c in choices}
    key = str(value).lower().replace("-", "").replace("_", "").replace(".", "")
    if key in norm:
        return f" (did you mean '{norm[key]}'?)"
    close = difflib.get_close_matches(key, list(norm), n=1, cutoff=0.6)
    return f" (did you mean '{norm[close[0]]}'?)" if close else ""


def get(name: str, size: str) -> Architecture:
    """The checkpoint for an architecture name and size; a VrayError lists the valid ones."""
    if name not in FAMILIES:
        raise VrayError(
            f"architecture.name: '{name}' is not a supported architecture{suggest(name, architecture_names())}; "
            f"valid: {', '.join(architecture_names())}"
        )
    for arch in ARCHITECTURES:
        if arch.name == name and arch.size == size:
            return arch
    raise VrayError(
        f"architecture.size: '{size}' is not a size of {name}{suggest(size, sizes_of(name))}; "
        f"valid sizes: {', '.join(sizes_of(name))}"
    )


# Other model types of the same checkpoints: NVILA-Lite's -hf-preview layout says `vila`.
MODEL_TYPE_ALIASES = {"vila": "nvila_lite"}


def by_model_type(model_type: str) -> list[Architecture]:
    """Checkpoints whose config has this model_type (or one of its aliases)."""
    model_type = MODEL_TYPE_ALIASES.get(model_type, model_type)
    return [a for a in ARCHITECTURES if a.model_type == model_type]


def config_filename(repo_id: str) -> str:
    """File name of a checkpoint's shipped config.json under vray/archs/configs/."""
    return repo_id.replace("/", "__") + ".json"


@cache
def _shipped_config(repo_id: str) -> dict[str, Any]:
    path = resources.files("vray.archs").joinpath("configs", config_filename(repo_id))
    return json.loads(path.read_text())
