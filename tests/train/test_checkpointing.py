"""Gradient checkpointing in one process: it really recomputes the decoder layers, a frozen vision tower builds no
autograd graph (nor runs a backward), and what trains still gets its gradients."""

from __future__ import annotations

import pytest
import torch

from vray.archs import registry
from vray.data.io import read_jsonl
from vray.data.synthetic import split_paths
from vray.errors import SpecError
from vray.models.loader import load_processor, prepare_for_training, resolve_source
from vray.spec import LoraBlock, validate_spec

ARCHS = {"qwen3_vl": ("qwen3vl", "2B"), "qwen2_5_vl": ("qwen2.5vl", "3B"), "internvl": ("internvl3.5", "8B"),
         "nvila_lite": ("nvila-lite", "2B")}


def _batch(family: str) -> dict[str, torch.Tensor]:
    from vray.data.collate import Collator

    arch = registry.get(*ARCHS[family])
    processor = load_processor(resolve_source(f"tiny:{family}"))
    collator = Collator(processor, arch, None)
    train, _ = split_paths("synthetic:vqa?train=4&eval=1")
    samples = read_jsonl(train)[:2]
    return collator.batch([collator.encode(s) for s in samples])


def _vision_and_trainable(model: torch.nn.Module, arch) -> tuple[list[str], list[str]]:
    """Names of the vision tower's modules that hold no trainable parameter, and of the trainable parameters."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen = []
    for prefix in arch.vision_modules:
        for name, module in base.named_modules():
            if name.startswith(prefix) and not any(name.startswith(p) for p in arch.projector_modules):
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    frozen.append(name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return frozen, trainable


@pytest.mark.parametrize("family,mode", [("qwen3_vl", "LoRA"), ("qwen2_5_vl", "Full"), ("internvl", "LoRA"),
                                         ("nvila_lite", "Full")])
def test_checkpointing_recomputes_and_a_frozen_tower_builds_no_graph(family, mode):
    arch = registry.get(*ARCHS[family])
    model, dtype = prepare_for_training(resolve_source(f"tiny:{family}"), arch, mode, "Float32", None,
                                        LoraBlock(dropout=0.0), torch.device("cpu"), gradient_checkpointing=True)
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    frozen, trainable = _vision_and_trainable(model, arch)
    assert frozen and trainable
    named = dict(base.named_modules())
    graph: dict[str, bool] = {}
    for name in frozen:
        def seen(module, args, out, name=name):
            tensors = [out] if isinstance(out, torch.Tensor) else [t for t in getattr(out, "values", lambda: out)()
                                                                  if isinstance(t, torch.Tensor)]
            graph[name] = graph.get(name, False) or any(t.requires_grad for t in tensors)
        named[name].register_forward_hook(seen)
    layers = base.get_submodule(f"{arch.language_model_prefix}.layers")
    calls = [0]  # a module inside the first decoder layer: its hooks run again when the layer is recomputed
    next(layers[0].children()).register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    batch = _batch(family)
    loss = model(**batch).loss
    assert calls[0] == 1
    loss.backward()
    assert calls[0] == 2, "the decoder layer was not recomputed in the backward pass"
    assert graph and not any(graph.values()), [n for n, g in graph.items() if g]
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None][:5]
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert any(float(g.abs().sum()) > 0 for g in (lora_b or list(grads.values())))
    if mode == "Full":
        projector = [g for n, g in grads.items() if any(n.startswith(p) for p in arch.projector_modules)]
        assert projector and any(float(g.abs().sum()) > 0 for g in projector)  # the merger inside the tower trains


def test_one_switch_forces_checkpointing_on_or_off_in_every_plan():
    from vray.plan.gpus import Inventory, gpu
    from vray.plan.planner import cpu_plan, plan_run
    def spec(setting: str | None):
        cluster = {"gradientCheckpointing": setting} if setting else {}
        return validate_spec({"architecture": {"name": "qwen3vl", "size": "8B"}, "cluster": cluster})

    assert spec(None).cluster.gradientCheckpointing == "auto"
    roomy, tight = Inventory(gpu("H200-141GB")), Inventory(gpu("L4-24GB"))
    assert plan_run(spec("auto"), roomy).gradient_checkpointing is False
    assert plan_run(spec("on"), roomy).gradient_checkpointing is True
    assert plan_run(spec("auto"), tight).gradient_checkpointing is True
    forced_off = plan_run(spec("off"), tight)
    assert not forced_off.fits or forced_off.gradient_checkpointing is False
    assert [cpu_plan(spec(s)).gradient_checkpointing for s in ("auto", "on", "off")] == [False, True, False]
    with pytest.raises(SpecError, match="gradientCheckpointing"):
        spec("sometimes")
