"""Fast kernels for training on a GPU: each is used when it is installed and fits the device, and named when it is
not (one event a kernel, for metrics.jsonl and the worker's log).

- attention: FlashAttention-3 (`flash_attn_interface`, Hopper) or FlashAttention-2 (`flash_attn`, Ampere and later)
  at bf16 / fp16, else PyTorch's SDPA. Both flash paths take packed rows (varlen) through `position_ids`;
- Liger's RMSNorm / SwiGLU / RoPE kernels for the families Liger has a patch for (its loss kernels stay off: the
  label-only loss is vray's own);
- the fused experts of sparse-MoE families through transformers' grouped GEMM (`experts_implementation`);
- regional `torch.compile` of the decoder layers, when `compute.compile` asks for it;
- Qwen3.5's Gated DeltaNet: flash-linear-attention and causal-conv1d, without which it runs a slow PyTorch loop.

On the CPU nothing changes: SDPA, no patch, no compile, the loading options as they always were.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vray.archs.registry import Architecture

# Liger-Kernel's patch per model_type (liger_kernel.transformers.apply_liger_kernel_to_<model_type>).
LIGER_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def installed(module: str) -> bool:
    """Whether `module` can be imported here (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def distributed(name: str) -> bool:
    """Whether the distribution `name` is installed (flash-attn and flash-attn-4 both install `flash_attn`:
    transformers runs FlashAttention-2 only from the first)."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@dataclass
class Kernels:
    """What one worker's model runs on, and the events saying so."""

    attention: str | None = None  # attn_implementation at load; None: transformers' default (sdpa)
    experts: str | None = None  # experts_implementation at load; None: transformers' default
    liger: str | None = None  # the Liger patch to apply after loading (a model_type), or None
    compile: bool = False  # compile each decoder layer (regional torch.compile)
    events: list[dict[str, Any]] = field(default_factory=list)

    def load_kwargs(self) -> dict[str, Any]:
        """The options `from_pretrained` / `from_config` take for these kernels (none on the CPU)."""
        out: dict[str, Any] = {}
        if self.attention:
            out["attn_implementation"] = self.attention
        if self.experts:
            out["experts_implementation"] = self.experts
        return out

    def _use(self, kernel: str, using: str) -> None:
        self.events.append({"event": "kernel", "kernel": kernel, "using": using})

    def _skip(self, kernel: str, message: str) -> None:
        self.events.append({"event": "warning", "kernel": kernel, "message": message})

    def warnings(self) -> list[str]:
        return [e["message"] for e in self.events if e["event"] == "warning"]


def choose(arch: Architecture, device: torch.device, precision: str, compile: bool = False,
           strategy: str = "ddp") -> Kernels:
    """The kernels a worker uses for `arch` on `device` at `precision` (BFloat16, Float16, Float32)."""
    kernels = Kernels()
    if device.type != "cuda":
        if compile:
            kernels._skip("compile", "compute.compile: the decoder layers are compiled on a GPU only; the CPU runs "
                                     "them eagerly")
        return kernels
    _choose_attention(kernels, arch, device, precision)
    if arch.model_type.endswith("_moe"):
        kernels.experts = "grouped_mm"
        kernels._use("experts", "grouped_mm")
    _choose_liger(kernels, arch)
    if compile:
        if strategy == "ddp":
            kernels.compile = True
            kernels._use("compile", "torch.compile per decoder layer")
        else:
            kernels._skip("compile", f"compute.compile: not applied under plan.strategy {strategy} (its wrapping hooks "
                                     "each layer); the layers run eagerly")
    if arch.model_type.startswith("qwen3_5"):
        missing = [pkg for pkg, module in (("flash-linear-attention", "fla"), ("causal-conv1d", "causal_conv1d"))
                   if not installed(module)]
        if missing:
            kernels._skip("linear_attention", (
                f"{' and '.join(missing)} not installed: Qwen3.5's Gated DeltaNet layers run the slow PyTorch path "
                f"(pip install {' '.join(missing)}; cluster/Dockerfile installs them)"))
        else:
            kernels._use("linear_attention", "flash-linear-attention + causal-conv1d")
    return kernels


def _supports_flash(arch: Architecture) -> bool:
    import transformers

    cls = getattr(transformers, arch.transformers_class, None)
    return bool(getattr(cls, "_supports_flash_attn", True))


def _choose_attention(kernels: Kernels, arch: Architecture, device: torch.device, precision: str) -> None:
    major, _ = _capability(device)
    why = None
    if precision == "Float32":
        why = "flash-attention needs bf16 or fp16 (compute.precisionType is Float32)"
    elif not _supports_flash(arch):
        why = f"{arch.transformers_class} has no flash-attention path in transformers"
    elif major >= 9 and installed("flash_attn_interface") and distributed("flash-attn-3"):
        kernels.attention = "flash_attention_3"
    elif major >= 8 and installed("flash_attn") and distributed("flash-attn"):
        kernels.attention = "flash_attention_2"
    elif major < 8:
        why = f"flash-attention needs an Ampere or newer GPU (compute capability {major}.x)"
    else:
        why = "flash-attn is not installed (pip install flash-attn; cluster/Dockerfile installs it)"
    if kernels.attention:
        kernels._use("attention", kernels.attention)
    else:
        kernels._skip("attention", f"attention runs on PyTorch SDPA: {why}")


def _choose_liger(kernels: Kernels, arch: Architecture) -> None:
    if arch.model_type not in LIGER_FAMILIES:
        kernels._skip("liger", f"Liger kernels: no patch for {arch.model_type}; its norms and MLPs run in PyTorch")
    elif not installed("liger_kernel"):
        kernels._skip("liger", "liger-kernel is not installed: RMSNorm, SwiGLU and RoPE run in PyTorch "
                               "(pip install 'vray[gpu]')")
    else:
        kernels.liger = arch.model_type


def apply_after_load(model: nn.Module, arch: Architecture, kernels: Kernels) -> None:
    """Patch the loaded model (before LoRA wraps it) with the chosen Liger kernels; a patch that fails is named and
    the model keeps its PyTorch modules."""
    if not kernels.liger:
        return
    try:
        import liger_kernel.transformers as liger

        patch = getattr(liger, f"apply_liger_kernel_to_{kernels.liger}")
        # Norms, MLP and RoPE only (what Liger's patch for the family defaults to); the loss stays vray's own.
        patch(cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not fit this transformers must not stop the run
        kernels.liger = None
        kernels._skip("liger", f"Liger kernels not applied ({type(exc).__name__}: {exc}); norms and MLPs run in "
                               "PyTorch")
        return
    kernels._use("liger", f"apply_liger_kernel_to_{arch.model_type} (RMSNorm, SwiGLU, RoPE where Liger patches them)")


def decoder_layers(model: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The language model's decoder layers, in order (found under `arch.language_model_prefix`)."""
    for name, module in model.named_modules():
        bare = name.removeprefix("base_model.model.")
        if bare == f"{arch.language_model_prefix}.layers" and isinstance(module, nn.ModuleList):
            return list(module)
    return []


def apply_compile(model: nn.Module, arch: Architecture, kernels: Kernels) -> None:
    """Regional compilation: each decoder layer compiled on its own (the layers share one compiled graph, so the
    compile time is one layer's, and the rest of the model stays eager)."""
    if not kernels.compile:
        return
    for layer in decoder_layers(model, arch):
        layer.compile(dynamic=None)


def report(kernels: Kernels, write: Any) -> None:
    """Each kernel event through `write` (the metrics log), and each skipped kernel on stderr too (the worker log)."""
    for event in kernels.events:
        write(dict(event))
        if event["event"] == "warning":
            print(f"vray: {event['message']}", file=sys.stderr, flush=True)
