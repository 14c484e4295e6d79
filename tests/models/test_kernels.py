"""The GPU kernels (vray.models.kernels): each is chosen when it is installed and fits the device, and named when it
is not; on the CPU nothing changes. CUDA and the kernel packages are simulated: a fake device capability and fake
importable packages on the path."""

from __future__ import annotations

import pytest
import torch

from vray.archs import registry
from vray.models import kernels, loader

QWEN3_VL = registry.get("qwen3vl", "2B")
QWEN3_VL_MOE = registry.get("qwen3vl", "30B-A3B")
QWEN3_5 = registry.get("qwen3.5", "9B")
CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A fake CUDA device of capability (major, 0), and `install(name)` to put a fake package on the path."""
    def on(major: int = 9):
        monkeypatch.setattr(kernels, "_capability", lambda device: (major, 0))

    def install(*names: str, distribution: str | None = None):
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("")
        if distribution:
            info = tmp_path / f"{distribution.replace('-', '_')}-1.0.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
        monkeypatch.syspath_prepend(str(tmp_path))

    on()
    return on, install


def _kinds(k: kernels.Kernels) -> dict[str, str]:
    return {e["kernel"]: e.get("using") or "skipped" for e in k.events}


def test_the_cpu_runs_sdpa_and_no_kernel_and_loads_as_before(monkeypatch):
    cpu = torch.device("cpu")
    for arch in (QWEN3_VL, QWEN3_VL_MOE, QWEN3_5):
        k = kernels.choose(arch, cpu, "BFloat16")
        assert k.load_kwargs() == {} and not k.liger and not k.compile and k.events == []
        assert loader.model_kwargs(arch, cpu, k) == loader.model_kwargs(arch, cpu) == {}
    assert _kinds(kernels.choose(QWEN3_VL, cpu, "BFloat16", compile=True)) == {"compile": "skipped"}

    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError):
        loader.load_model(loader.Path("x"), QWEN3_VL_MOE, "BFloat16", device=cpu,
                          kernels=kernels.choose(QWEN3_VL_MOE, cpu, "BFloat16"))
    assert seen == {"device_map": {"": cpu}, "dtype": torch.bfloat16}  # no attention or experts option on the CPU


def test_flash_attention_is_chosen_when_installed_on_a_gpu_that_runs_it(gpu):
    on, install = gpu
    k = kernels.choose(QWEN3_VL, CUDA, "BFloat16")
    assert k.attention is None and "flash-attn is not installed" in k.warnings()[0]
    install("flash_attn")  # without the flash-attn distribution (flash-attn-4 installs flash_attn too): not FA2
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").attention is None
    install(distribution="flash-attn")
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").load_kwargs() == {"attn_implementation": "flash_attention_2"}
    assert kernels.choose(QWEN3_VL, CUDA, "Float32").attention is None  # fp32: SDPA, said so
    on(7)
    assert kernels.choose(QWEN3_VL, CUDA, "Float16").attention is None
    on(9)
    install("flash_attn_interface", distribution="flash-attn-3")  # FlashAttention-3, on Hopper only
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").attention == "flash_attention_3"
    on(8)
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").attention == "flash_attention_2"


def test_liger_grouped_experts_and_linear_attention_on_a_gpu(gpu, capsys):
    _, install = gpu
    moe = kernels.choose(QWEN3_VL_MOE, CUDA, "BFloat16")
    assert moe.load_kwargs() == {"experts_implementation": "grouped_mm"}
    assert _kinds(moe) == {"attention": "skipped", "experts": "grouped_mm", "liger": "skipped"}
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").experts is None  # dense: no experts option

    qwen35 = kernels.choose(QWEN3_5, CUDA, "BFloat16")
    (line,) = [m for m in qwen35.warnings() if "Gated DeltaNet" in m]
    assert "flash-linear-attention and causal-conv1d not installed" in line
    written: list[dict] = []
    kernels.report(qwen35, written.append)
    assert written == qwen35.events
    assert "Gated DeltaNet" in capsys.readouterr().err  # the worker's log, not only metrics.jsonl

    install("liger_kernel", "fla", "causal_conv1d")
    ready = kernels.choose(QWEN3_5, CUDA, "BFloat16")
    assert ready.liger == "qwen3_5"
    assert _kinds(ready)["linear_attention"] == "flash-linear-attention + causal-conv1d"
    assert kernels.choose(registry.get("internvl3.5", "8B"), CUDA, "BFloat16").liger is None  # no Liger patch


def test_liger_is_applied_without_its_loss_kernels_and_a_failure_is_named(gpu, tmp_path):
    _, install = gpu
    install("liger_kernel")
    (tmp_path / "liger_kernel" / "transformers.py").write_text(
        "calls = []\n"
        "def apply_liger_kernel_to_qwen3_vl(**kwargs):\n    calls.append(kwargs)\n"
        "def apply_liger_kernel_to_qwen3_5(**kwargs):\n    raise TypeError('unexpected model')\n")
    import liger_kernel.transformers as fake

    model = torch.nn.Linear(2, 2)
    k = kernels.choose(QWEN3_VL, CUDA, "BFloat16")
    kernels.apply_after_load(model, QWEN3_VL, k)
    assert fake.calls == [{"cross_entropy": False, "fused_linear_cross_entropy": False, "model": model}]
    assert _kinds(k)["liger"].startswith("apply_liger_kernel_to_qwen3_vl")

    failing = kernels.choose(QWEN3_5, CUDA, "BFloat16")
    kernels.apply_after_load(model, QWEN3_5, failing)
    assert failing.liger is None and any("Liger kernels not applied (TypeError" in m for m in failing.warnings())


def test_compile_is_regional_and_only_under_ddp(gpu):
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16").compile is False  # off by default
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16", compile=True).compile is True
    assert kernels.choose(QWEN3_VL, CUDA, "BFloat16", compile=True, strategy="fsdp2").compile is False


def test_compile_wraps_each_decoder_layer_and_nothing_else():
    model = loader.load_model(loader.resolve_source("tiny:qwen3_vl"), QWEN3_VL, "Float32")
    kernels.apply_compile(model, QWEN3_VL, kernels.Kernels())  # not chosen: nothing compiled
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())
    kernels.apply_compile(model, QWEN3_VL, kernels.Kernels(compile=True))  # lazy: compiles at the first call
    layers = kernels.decoder_layers(model, QWEN3_VL)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()) == len(layers)
