"""The per-worker cost of a LoRA step: the adapters' GEMMs run in the compute dtype under autocast over fp32 master
adapters, dropout 0 runs no dropout op, and `every:k` checkpointing recomputes only every k-th decoder layer with
the same gradients as none."""

from __future__ import annotations

import pytest
import torch

from vray.archs import registry
from vray.data.io import read_jsonl
from vray.data.synthetic import split_paths
from vray.models.kernels import decoder_layers
from vray.models.loader import load_processor, parameter_groups, prepare_for_training, resolve_source
from vray.spec import LoraBlock

ARCHS = {"qwen3_vl": ("qwen3vl", "2B"), "qwen3_5": ("qwen3.5", "9B")}


def _batch(family: str) -> dict[str, torch.Tensor]:
    from vray.data.collate import Collator

    arch = registry.get(*ARCHS[family])
    collator = Collator(load_processor(resolve_source(f"tiny:{family}")), arch, None)
    samples = read_jsonl(split_paths("synthetic:vqa?train=4&eval=1")[0])[:2]
    return collator.batch([collator.encode(s) for s in samples])


def _lora(family: str, precision: str, **kwargs):
    arch = registry.get(*ARCHS[family])
    torch.manual_seed(0)
    model, autocast = prepare_for_training(resolve_source(f"tiny:{family}"), arch, "LoRA", precision, None,
                                           LoraBlock(dropout=0.0), torch.device("cpu"), **kwargs)
    return model.train(), autocast, arch


def test_adapter_gemms_run_in_bf16_over_fp32_masters():
    model, autocast, arch = _lora("qwen3_vl", "BFloat16")
    assert autocast is torch.bfloat16
    adapters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and {p.dtype for p in adapters.values()} == {torch.float32}
    optimized = [p for g in parameter_groups(model, arch, 1e-4) for p in g["params"]]
    assert {p.dtype for p in optimized} == {torch.float32} and len(optimized) == len(adapters)

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    dropouts = []
    for name, module in model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        if name.endswith("lora_dropout.default"):
            dropouts.append(module)
    assert dropouts and all(isinstance(d, torch.nn.Identity) for d in dropouts)  # dropout 0: no dropout op
    with torch.autocast("cpu", dtype=autocast):
        loss = model(**_batch("qwen3_vl")).loss
    loss.backward()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # no fp32 copy of the inputs, bf16 GEMMs
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())

    # Without autocast peft still casts the input to the adapter's dtype (an fp32 adapter never meets bf16).
    seen.clear()
    with torch.no_grad():
        model(**_batch("qwen3_vl"))
    assert {s[0] for s in seen} == {torch.float32}


def test_an_fp32_lora_run_is_unchanged():
    from peft import LoraConfig, get_peft_model

    from vray.models.loader import load_model, lora_target_modules

    model, autocast, arch = _lora("qwen3_vl", "Float32")
    assert autocast is None
    torch.manual_seed(0)
    base = load_model(resolve_source("tiny:qwen3_vl"), arch, "Float32")
    plain = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                            target_modules=lora_target_modules(base, arch, LoraBlock())))
    plain.train()
    for p, q in zip(model.parameters(), plain.parameters()):
        q.data.copy_(p.data)
    batch = _batch("qwen3_vl")
    assert torch.equal(model(**batch).loss, plain(**batch).loss)


def _grads_with_checkpointing(family: str, **kwargs) -> tuple[dict[str, torch.Tensor], list[int]]:
    arch = registry.get(*ARCHS[family])
    torch.manual_seed(0)
    model, _ = prepare_for_training(resolve_source(f"tiny:{family}"), arch, "Full", "Float32", None, LoraBlock(),
                                    torch.device("cpu"), **kwargs)
    model.train()
    layers = decoder_layers(model, arch)
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # a module inside each layer: its hooks run again when the layer recomputes
        layer.post_attention_layernorm.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model(**_batch(family)).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_every_k_recomputes_every_kth_decoder_layer_with_the_same_gradients(family):
    reference, calls = _grads_with_checkpointing(family)
    assert set(calls) == {1}  # no checkpointing: one forward a layer
    grads, calls = _grads_with_checkpointing(family, gradient_checkpointing=True, checkpoint_every=2)
    assert calls == [2 if i % 2 == 0 else 1 for i in range(len(calls))]  # half the layers recomputed
    assert sum(c == 2 for c in calls) == len(calls) // 2
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    _, every = _grads_with_checkpointing(family, gradient_checkpointing=True, checkpoint_every=1)
    assert set(every) == {2}
