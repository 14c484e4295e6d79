"""The memory model against real tensors: tiny checkpoints loaded, adapted and stepped on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from vray.archs import registry
from vray.data import synthetic
from vray.data.collate import Collator
from vray.data.io import read_jsonl
from vray.models.loader import load_processor, prepare_for_training
from vray.models.sharded import LOAD_CHUNK_BYTES
from vray.models.tiny import REFERENCE, tiny_checkpoint
from vray.plan.memory import Layout, Workload, activation_bytes, quantized_bytes, sample_shape, static_bytes
from vray.plan.profile import profile_model
from vray.spec import LoraBlock, QuantizationBlock


def _meta_profile(family: str):
    """The profile of a tiny checkpoint built from its config on the meta device (as the planner does)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = tiny_checkpoint(family)
    arch = registry.get(*REFERENCE[family])
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    raw = json.loads((folder / "config.json").read_text())
    return profile_model(meta, arch, raw), arch, folder


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters, counting each storage once, plus 4-bit quantization constants."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += _tensor_bytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code) + (_tensor_bytes(qs.offset) if qs.offset is not None else 0)
            if qs.nested:
                total += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code)
    return total


@pytest.mark.parametrize(("family", "mode"), [
    ("qwen2_5_vl", "lora"), ("qwen2_5_vl", "qlora"), ("qwen2_5_vl", "full"),
    ("qwen3_5", "lora"), ("qwen3_5", "full"), ("qwen3_vl_moe", "qlora"),
])
def test_estimated_weights_gradients_optimizer_match_the_tensors(family, mode):
    profile, arch, folder = _meta_profile(family)
    lora = LoraBlock()
    w = Workload(mode, "BFloat16", "AdamW", lora.rank, lora.dropout, arch.lora_target_regex() if mode != "full" else None)
    est_weights, est_grads, est_optim, _ = static_bytes(profile, w, Layout("ddp", 1, 8, 1, False))

    quant = QuantizationBlock(enabled=mode == "qlora", type="NF4")
    model, autocast = prepare_for_training(folder, arch, "Full" if mode == "full" else "LoRA", "BFloat16", quant, lora,
                                           torch.device("cpu"))
    assert _weight_bytes(model) == pytest.approx(est_weights, rel=0.01)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    processor = load_processor(folder)
    sample = read_jsonl(synthetic.split_paths("synthetic:vqa?train=8&eval=2")[0])[0]
    collator = Collator(processor, arch, "Answer briefly.")
    batch = collator.batch([collator.encode(sample)])
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    grads = sum(_tensor_bytes(p.grad) for p in trainable if p.grad is not None)
    assert grads == pytest.approx(est_grads, rel=0.01)
    optimizer.step()
    states = sum(_tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert states == pytest.approx(est_optim, rel=0.01)
    if mode == "full":  # fp32 master weights for what trains, the run's precision for the frozen vision tower
        assert {p.dtype for p in trainable} == {torch.float32}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_quantized_weight_bytes_follow_bitsandbytes():
    # 4096 weights: 2048 bytes packed, 64 absmax bytes, one nested fp32 absmax, and the per-layer code tables.
    assert quantized_bytes(4096) == 2048 + 64 + 4 + 1092
    big = 4096 * 4096
    assert quantized_bytes(big) / big == pytest.approx(0.5 + 1 / 64, rel=0.01)


def test_activations_follow_the_sample_and_the_settings():
    profile, arch, _ = _meta_profile("qwen2_5_vl")
    w = Workload("lora", "BFloat16", lora_dropout=0.05, lora_regex=arch.lora_target_regex())
    small = sample_shape(profile, max_pixels=256 * 256)
    large = sample_shape(profile)
    assert large.visual_tokens > small.visual_tokens and large.sequence == 512 + large.visual_tokens
    one, _ = activation_bytes(profile, w, Layout("ddp", 1, 8, 1, False), large)
    two, _ = activation_bytes(profile, w, Layout("ddp", 1, 8, 2, False), large)
    ckpt, _ = activation_bytes(profile, w, Layout("ddp", 1, 8, 1, True), large)
    shorter, _ = activation_bytes(profile, w, Layout("ddp", 1, 8, 1, False), small)
    assert two > one > ckpt and shorter < one
    no_dropout = Workload("lora", "BFloat16", lora_dropout=0.0, lora_regex=arch.lora_target_regex())
    assert activation_bytes(profile, no_dropout, Layout("ddp", 1, 8, 1, False), large)[0] < one
    # Full fine-tuning trains the head: the label-only loss holds its (vocab, hidden) fp32 gradient from the
    # forward on, which LoRA (a frozen head) never does.
    full = Workload("full", "BFloat16")
    _, parts = activation_bytes(profile, full, Layout("ddp", 1, 8, 1, False), large)
    _, lora_parts = activation_bytes(profile, w, Layout("ddp", 1, 8, 1, False), large)
    assert parts["head"] == profile.text.vocab * profile.text.hidden * (4 + 2 * 2) and lora_parts["head"] == 0
    video = sample_shape(profile, max_frames=16)
    assert video.frames == 16 and video.images == 0 and video.visual_tokens > 0


@pytest.mark.parametrize("scope", [("language",), ("language", "projector"), ("language", "projector", "vision")])
def test_the_plan_counts_the_adapters_the_loader_creates(scope):
    """The memory model and the loader share one LoRA target rule: the Linears the plan counts are the ones peft
    gets, for every lora.scope."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vray.models.loader import lora_target_modules
    from vray.plan.memory import param_split

    profile, arch, folder = _meta_profile("qwen2_5_vl")
    lora = LoraBlock(scope=scope)
    w = Workload("lora", "BFloat16", "AdamW", lora.rank, lora.dropout, arch.lora_target_regex(), lora_scope=scope)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    created = lora_target_modules(model, arch, lora)
    assert param_split(profile, w).lora_targets == len(created) > 0


def test_cpu_plans_carry_a_per_worker_memory_model_of_the_checkpoint_they_load():
    """A CPU plan sizes the checkpoint `model.source` names (here the tiny one, not the 3B it is shaped like): one
    worker's step and load peaks, against the tensors the loader really creates, and all workers' per host."""
    from vray.plan.plan import Plan
    from vray.plan.planner import cpu_plan
    from vray.spec import validate_spec

    folder = tiny_checkpoint("qwen2_5_vl")
    arch = registry.get(*REFERENCE["qwen2_5_vl"])
    lora = LoraBlock()
    model, _ = prepare_for_training(folder, arch, "LoRA", "BFloat16", QuantizationBlock(), lora, torch.device("cpu"))
    params = {n: p for n, p in model.named_parameters()}
    base = sum(_tensor_bytes(p) for p in params.values() if not p.requires_grad)
    largest = max(p.numel() for p in params.values())

    def plan_for(strategy, **sample):
        spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
                              "compute": {"precisionType": "BFloat16"}, "hyperparameters": {"batchSize": 2},
                              "media": {"maxPixels": 56 * 56}, "cluster": {"workers": 2, "strategy": strategy}})
        return cpu_plan(spec, **sample)

    ddp = plan_for("ddp")
    assert ddp.fits and ddp.per_gpu_bytes.weights == pytest.approx(_weight_bytes(model), rel=0.01)
    assert ddp.per_gpu_bytes.other == 0  # no GPU framework overhead, no margin
    # from_pretrained reads each tensor in the file's fp32 before it casts it: the base at bf16 plus one fp32 tensor.
    assert ddp.load_peak_bytes.per_gpu == pytest.approx(base + 4 * largest, rel=0.01)
    assert ddp.load_peak_bytes.per_host == 2 * ddp.load_peak_bytes.per_gpu
    assert Plan.from_dict(ddp.to_dict()) == ddp
    zero3 = plan_for("zero3")
    # Partitions are read in place, one chunk (at most a tensor in fp32) at a time; no module is gathered.
    assert zero3.load_peak_bytes.per_gpu == pytest.approx(base / 2 + min(LOAD_CHUNK_BYTES, 4 * largest), rel=0.01)
    assert zero3.per_gpu_bytes.weights < ddp.per_gpu_bytes.weights
    fsdp2 = plan_for("fsdp2")
    adapters = sum(_tensor_bytes(p) for p in params.values() if p.requires_grad)  # fp32, sharded with the base
    assert fsdp2.load_peak_bytes.per_gpu == pytest.approx((base + adapters) / 2 + 4 * largest, rel=0.01)  # one chunk
    # The activations follow the micro-batch a caller names: 32 text tokens are far fewer than the default 512.
    short = plan_for("ddp", sample=sample_shape(profile_of(folder, arch), max_pixels=56 * 56, text_tokens=32))
    assert 0 < short.per_gpu_bytes.activations < ddp.per_gpu_bytes.activations / 8
    assert short.assumptions["text_tokens"] == 32


def profile_of(folder, arch):
    from vray.plan.profile import checkpoint_profile

    return checkpoint_profile(folder, arch)
