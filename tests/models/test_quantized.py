"""4-bit layers survive vray's evaluation on every CPU: train -> evaluate -> train -> merged export.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for CPU inference the first time it runs in eval mode
without gradients, and training or merging then reads the packed weights (vray.models.quantized). These tests force
that path on any CPU: the repack itself is plain torch, gated only by the layer's `support_avx512bf16_for_cpu`
switch, which they turn on for every 4-bit layer, as bitsandbytes does on such a machine.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from vray.errors import VrayError
from vray.models.quantized import REPACK_SWITCH, keep_4bit_layout, repacked_layers
from vray.spec import QuantizationBlock, validate_spec
from vray.train.launcher import train_local
from vray.train.prepare import prepare

DATA = "synthetic:vqa?train=32&eval=8"


def _linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _arm_repack(model: nn.Module) -> int:
    """Turn on bitsandbytes' CPU repack on every 4-bit layer (what it does by itself on an AVX512-BF16 CPU)."""
    layers = _linear4bit_layers(model)
    for layer in layers:
        setattr(layer, REPACK_SWITCH, True)
    return len(layers)


def _quantized_layer() -> nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(nn.Linear(64, 64).state_dict())
    return layer.to("cpu")  # quantizes the weight


def test_an_armed_layer_is_disarmed_and_a_repacked_one_is_refused_by_name():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = nn.Sequential(_quantized_layer(), _quantized_layer())
    assert _arm_repack(model) == 2
    assert keep_4bit_layout(model) == 2
    assert not any(getattr(m, REPACK_SWITCH, False) for m in model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 64, dtype=torch.bfloat16))
    assert repacked_layers(model) == []
    # A layer that something outside vray already repacked cannot be trained or merged exactly: refused, named.
    layer = model[1]
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    with pytest.raises(VrayError, match=r"^1: this 4-bit layer was repacked"):
        keep_4bit_layout(model)


def test_loading_disarms_the_layers_bitsandbytes_arms_on_an_avx512bf16_cpu(monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    from vray.archs import registry
    from vray.models.loader import load_model, resolve_source

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # what bitsandbytes finds on such a CPU
    assert getattr(_quantized_layer(), REPACK_SWITCH)  # bitsandbytes arms every layer it builds
    model = load_model(resolve_source("tiny:qwen2_5_vl"), registry.get("qwen2.5vl", "3B"), "BFloat16",
                       QuantizationBlock(enabled=True, type="NF4"))
    layers = _linear4bit_layers(model)
    assert layers and not any(getattr(m, REPACK_SWITCH) for m in layers)


def _qlora_spec(tmp_path: Path, name: str) -> object:
    return validate_spec({
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "BFloat16"}, "quantization": {"enabled": True},
        "task": "vqa", "data": {"train": DATA}, "lora": {"dropout": 0.0},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8},
        "checkpointing": {"everySteps": 2},  # 4 steps: evaluate at 0, 2 and 4, between the training steps
        "evaluation": {"maxNewTokens": 4, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": 1}, "output": str(tmp_path), "name": name,
    })


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_qlora_trains_evaluates_trains_and_merges_as_if_never_evaluated(tmp_path, monkeypatch):
    import vray.train.loop as loop
    from vray.infer.export import export_merged

    armed: list[int] = []
    evaluations: list[list[str]] = []
    real_prepare, real_validate = loop.prepare_for_training, loop.Recipe.validate

    def prepare_armed(*args, **kwargs):
        model, dtype = real_prepare(*args, **kwargs)
        armed.append(_arm_repack(model))
        return model, dtype

    def validate_and_look(self):
        out = real_validate(self)
        evaluations.append(repacked_layers(self.model))
        return out

    monkeypatch.setattr(loop, "prepare_for_training", prepare_armed)
    monkeypatch.setattr(loop.Recipe, "validate", validate_and_look)

    evaluated = train_local(prepare(_qlora_spec(tmp_path, "evaluated")))
    assert armed and armed[0] > 0  # the tiny model's language-model Linears are 4-bit, every one armed
    assert len(evaluations) == 3 and evaluations == [[], [], []]  # step 0, 2 and 4: nothing repacked
    losses = [r["loss"] for r in evaluated.read_metrics() if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # The same run without any evaluation in between (no held-out split): the same steps on the same weights.
    plain = prepare(_qlora_spec(tmp_path, "plain"))
    plain = train_local(replace(plain, eval_path=None))
    assert len(evaluations) == 3 and len(armed) == 2
    assert [r["loss"] for r in plain.read_metrics() if "loss" in r] == losses

    a = _safetensors(export_merged(str(evaluated.root), str(tmp_path / "merged-evaluated"), dtype="Float32"))
    b = _safetensors(export_merged(str(plain.root), str(tmp_path / "merged-plain"), dtype="Float32"))
    assert a.keys() == b.keys() and len(a) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_vray_eval_and_serving_leave_the_4bit_base_as_loaded(tmp_path, monkeypatch):
    import vray.infer.engine as serve_engine
    from vray.data import synthetic
    from vray.data.io import read_samples
    from vray.infer.evaluate import predict
    from vray.infer.target import resolve_target

    loaded: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    real_load = serve_engine.load_model

    def load_armed(*args, **kwargs):
        model = real_load(*args, **kwargs)
        assert _arm_repack(model) > 0
        loaded.append((model, {n: m.weight.data.clone() for n, m in model.named_modules() if hasattr(m, REPACK_SWITCH)}))
        return model

    monkeypatch.setattr(serve_engine, "load_model", load_armed)
    run = train_local(replace(prepare(_qlora_spec(tmp_path, "served")), eval_path=None))
    target = resolve_target(str(run.root))
    samples = read_samples(str(synthetic.split_paths(DATA)[1])).samples[:2]
    assert len(predict(target, samples, batch_size=2, device="cpu")) == 2  # what vray eval / predict run
    answer = serve_engine.ModelEngine(target, device="cpu").chat([{"role": "user", "content": "What colour is it?"}])
    assert answer.completion_tokens > 0  # what a replica runs for a request
    assert len(loaded) == 2
    for model, codes in loaded:
        assert repacked_layers(model) == []
        assert all(torch.equal(m.weight.data, codes[n]) for n, m in model.named_modules() if n in codes)
