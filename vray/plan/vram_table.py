"""`vray plan --table`: for every checkpoint x {LoRA, QLoRA NF4, full}, how many GPUs of each kind it needs."""

from __future__ import annotations

from dataclasses import dataclass

from vray.archs.registry import ARCHITECTURES, Architecture
from vray.plan.gpus import CATALOG, GPU, Inventory
from vray.plan.memory import Workload, sample_shape
from vray.plan.planner import min_gpus_ignoring_batch
from vray.plan.profile import arch_profile

MODES = ("LoRA", "QLoRA NF4", "Full")
TABLE_ASSUMPTIONS = (
    "bf16 (fp16 on T4), AdamW, LoRA rank 16 on the default targets, micro-batch 1, 512 text tokens + one "
    "1024x1024 image, nodes of 8 GPUs, the effective batch as large as the GPU count; cells give the fewest "
    "GPUs that fit (1 = one GPU), '-' where even 64 nodes do not."
)


@dataclass(frozen=True)
class Cell:
    """One table cell: the fewest GPUs, or None when it does not fit."""

    gpus: int | None
    applicable: bool = True

    def text(self) -> str:
        if not self.applicable:
            return "n/a"
        return "-" if self.gpus is None else str(self.gpus)


def _workload(arch: Architecture, mode: str, gpu: GPU) -> Workload | None:
    precision = "BFloat16" if gpu.bf16 else "Float16"
    if mode == "Full":
        return Workload("full", precision)
    if not arch.lora_supported:
        return None
    return Workload("qlora" if mode.startswith("QLoRA") else "lora", precision, lora_regex=arch.lora_target_regex())


def cell(arch: Architecture, mode: str, gpu: GPU) -> Cell:
    """How many GPUs of `gpu` one checkpoint needs in one mode."""
    w = _workload(arch, mode, gpu)
    if w is None:
        return Cell(None, applicable=False)
    profile = arch_profile(arch)
    return Cell(min_gpus_ignoring_batch(profile, w, sample_shape(profile), Inventory(gpu, 8, None)))


def vram_table() -> list[dict]:
    """Rows of the table: architecture, size, mode, assumed-config flag, and a cell per GPU kind."""
    rows = []
    for arch in ARCHITECTURES:
        for mode in MODES:
            rows.append({
                "name": arch.name, "size": arch.size, "mode": mode, "assumed": bool(arch.assumed),
                "gpus": {g.name: cell(arch, mode, g).text() for g in CATALOG.values()},
            })
    return rows
