"""The registry: 21 checkpoints, shipped real configs, exact meta-device parameter counts, LM-only LoRA targets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from torch import nn

from tests.conftest import run_cli
from vray.archs import registry
from vray.archs.build_configs import DEFAULT_REFERENCE, build_all, render
from vray.archs.registry import ARCHITECTURES
from vray.errors import VrayError
from vray.models.params import build_meta_model, param_counts

DESIGN_TABLE = {
    "qwen3.5": ["0.8B", "2B", "4B", "9B", "27B", "35B-A3B"],
    "qwen3vl": ["2B", "4B", "8B", "32B", "30B-A3B", "235B-A22B"],
    "qwen2.5vl": ["3B", "7B", "32B", "72B"],
    "nvila-lite": ["2B"],
    "cosmos-reason1": ["7B"],
    "cosmos-reason2": ["2B", "8B"],
    "internvl3.5": ["8B"],
}


def test_the_21_checkpoints_of_the_design_table():
    assert len(ARCHITECTURES) == 21
    assert {name: registry.sizes_of(name) for name in registry.architecture_names()} == DESIGN_TABLE


def test_repo_ids_follow_the_published_lines():
    for arch in ARCHITECTURES:
        if arch.name in ("qwen2.5vl", "qwen3vl"):
            assert arch.repo_id.endswith("-Instruct"), arch.repo_id
        if arch.name == "qwen3.5":
            assert arch.repo_id == f"Qwen/Qwen3.5-{arch.size}" and "Base" not in arch.repo_id
    assert registry.get("internvl3.5", "8B").repo_id == "OpenGVLab/InternVL3_5-8B-HF"
    assert registry.get("cosmos-reason2", "8B").gated


def test_lookup_errors_name_the_valid_choices():
    with pytest.raises(VrayError, match="valid sizes: 2B, 8B"):
        registry.get("cosmos-reason2", "7B")
    with pytest.raises(VrayError, match=r"did you mean 'qwen2.5vl'"):
        registry.get("qwen2.5-vl", "7B")


@pytest.mark.skipif(not DEFAULT_REFERENCE.exists(), reason="../shared/reference is not beside the checkout")
def test_shipped_configs_are_built_from_the_reference_table():
    built = build_all(DEFAULT_REFERENCE)
    shipped = Path(registry.__file__).parent / "configs"
    assert sorted(built) == sorted(p.name for p in shipped.glob("*.json"))
    for name, cfg in built.items():
        assert (shipped / name).read_text() == render(cfg), f"{name} is stale: run python -m vray.archs.build_configs"


def test_every_config_carries_its_source_and_assumptions():
    for arch in ARCHITECTURES:
        prov = arch.provenance
        assert prov["checkpoint"] == arch.repo_id
        assert prov["source"]
        assert isinstance(prov["verified"], bool)
    nvila = registry.get("nvila-lite", "2B")
    assert not nvila.lora_supported and not nvila.lora_targets
    # Only the unpublished language-model fields are assumed, each labelled; the width and the tower are known.
    assert set(nvila.assumed) == {f"text_config.{k}" for k in (
        "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "max_position_embeddings", "rope_theta", "tie_word_embeddings")}
    assert all("Qwen2.5-1.5B" in why for why in nvila.assumed.values())
    assert "text_config.vocab_size" in registry.get("qwen2.5vl", "72B").assumed


def test_meta_models_resolve_to_the_registry_class():
    for arch in ARCHITECTURES:
        if arch.native:
            assert arch.transformers_class.split(".")[-1] == type(build_meta_model(arch)).__name__


def _mtp_head_params(arch: registry.Architecture) -> int:
    """Qwen3.5's multi-token-prediction head (in the safetensors, not built by transformers):
    one gated-attention decoder layer, an fc from 2h to h, and three RMSNorms."""
    model = build_meta_model(arch)
    text = model.config.text_config
    layers = model.model.language_model.layers
    full = next(i for i, t in enumerate(text.layer_types) if t == "full_attention")
    h = text.hidden_size
    return sum(p.numel() for p in layers[full].parameters()) + 2 * h * h + 3 * h


@pytest.mark.parametrize(("name", "size", "mtp"), [
    ("qwen3vl", "8B", False), ("qwen3vl", "30B-A3B", False), ("qwen3vl", "235B-A22B", False),
    ("qwen3.5", "0.8B", True), ("qwen3.5", "4B", True), ("qwen3.5", "35B-A3B", True),
])
def test_parameter_counts_equal_the_published_safetensors(name, size, mtp):
    arch = registry.get(name, size)
    expected = arch.provenance["safetensors_total_params"]
    counts = param_counts(arch)
    assert counts.total + (_mtp_head_params(arch) if mtp else 0) == expected


def test_moe_active_parameters_scale_routed_experts_by_top_k():
    arch = registry.get("qwen3vl", "30B-A3B")
    c = param_counts(arch)
    cfg = arch.config["text_config"]
    assert c.experts > 0
    assert c.active == c.total - c.experts + c.experts * cfg["num_experts_per_tok"] // cfg["num_experts"]
    dense = param_counts(registry.get("qwen3vl", "8B"))
    assert dense.active == dense.total and dense.experts == 0


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(("name", "size"), [("qwen2.5vl", "3B"), ("internvl3.5", "8B"), ("qwen3.5", "35B-A3B"),
                                            ("qwen3vl", "2B")])
def test_default_lora_targets_stay_inside_the_language_model(name, size):
    arch = registry.get(name, size)
    model = build_meta_model(arch)
    pattern = re.compile(arch.lora_target_regex())
    hits = [n for n in _linear_names(model) if pattern.fullmatch(n)]
    assert hits and all(n.startswith("model.language_model.layers.") for n in hits)
    # Every default target name is adapted in the language model.
    for target in arch.lora_targets:
        assert any(n.endswith("." + target) for n in hits), target
    if name in ("qwen2.5vl", "internvl3.5"):
        # The trap is real: a plain suffix match would adapt the vision tower too.
        suffixes = tuple("." + t for t in arch.lora_targets)
        assert any(n.endswith(suffixes) and n.startswith(arch.vision_modules) for n in _linear_names(model))
    c = param_counts(arch)
    assert c.lora == sum(16 * (dict(model.named_modules())[n].in_features + dict(model.named_modules())[n].out_features) for n in hits)


def test_vray_archs_json_is_the_contract_list():
    proc = run_cli("archs", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 21
    keys = {"name", "size", "repo_id", "model_type", "transformers_class", "lora_supported", "box_convention",
            "verified", "assumed", "params"}
    for row in rows:
        assert keys <= set(row)
        assert set(row["params"]) == {"total", "vision", "language", "active", "lora"}
        assert row["params"]["total"] == row["params"]["vision"] + row["params"]["language"]
    by_key = {(r["name"], r["size"]): r for r in rows}
    assert by_key[("qwen3vl", "8B")]["params"]["total"] == 8767123696
    nvila = by_key[("nvila-lite", "2B")]
    assert nvila["params"]["lora"] == 0 and all(k.startswith("text_config.") for k in nvila["assumed"])
    # vray's own class, in the -hf layout; the projector alone is about 43.5M parameters of the vision side
    assert nvila["model_type"] == "nvila_lite" and nvila["repo_id"] == "Efficient-Large-Model/NVILA-Lite-2B-hf"
    assert nvila["transformers_class"] == "vray.models.nvila_lite.NVILALiteForConditionalGeneration"


def test_vray_archs_prints_the_table():
    from typer.testing import CliRunner

    from vray.cli import app

    result = CliRunner().invoke(app, ["archs"])
    assert result.exit_code == 0, result.output
    assert "21 supported checkpoints" in result.output
    assert "Qwen/Qwen3-VL-235B-A22B-Instruct" in result.output and "235.67B" in result.output
