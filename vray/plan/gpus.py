"""GPU catalog: usable memory, bf16 support, dense bf16 TFLOP/s and interconnect of each GPU kind vray plans for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vray.archs.registry import suggest
from vray.errors import VrayError

if TYPE_CHECKING:
    from vray.spec import RunSpec

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    """One GPU kind."""

    name: str
    memory_bytes: int  # what the driver reports as total (nvidia-smi), not the marketing figure
    bf16: bool
    tflops: float  # dense tensor-core TFLOP/s at bf16 (fp16 where the GPU has no bf16)
    interconnect: str  # within a node: "pcie" or "nvlink"
    host_memory_per_gpu: int  # CPU memory per GPU of the usual 8-GPU cloud node (what offload can use)
    ray_accelerator_types: tuple[str, ...] = ()

    @property
    def memory_gib(self) -> float:
        """Memory in GiB."""
        return self.memory_bytes / GIB


CATALOG: dict[str, GPU] = {
    g.name: g
    for g in (
        # host memory: g4dn.metal 384 GB, g6.48xlarge / g5.48xlarge 768 GB, p4d / p4de 1152 GB, p5 / p5e / p6 2 TB; / 8
        GPU("T4-16GB", 15360 * MIB, False, 65.0, "pcie", 48 * GIB, ("T4",)),
        GPU("L4-24GB", 23034 * MIB, True, 121.0, "pcie", 96 * GIB, ("L4",)),
        GPU("A10G-24GB", 23028 * MIB, True, 70.0, "pcie", 96 * GIB, ("A10G",)),
        GPU("A100-40GB", 40960 * MIB, True, 312.0, "nvlink", 144 * GIB, ("A100-40G",)),
        GPU("A100-80GB", 81920 * MIB, True, 312.0, "nvlink", 144 * GIB, ("A100-80G", "A100")),
        GPU("H100-80GB", 81559 * MIB, True, 989.0, "nvlink", 256 * GIB, ("H100",)),
        GPU("H200-141GB", 143771 * MIB, True, 989.0, "nvlink", 256 * GIB, ("H200",)),
        GPU("B200-192GB", 183359 * MIB, True, 2250.0, "nvlink", 256 * GIB, ("B200",)),
    )
}


def gpu(name: str) -> GPU:
    """A catalog entry by its command-line name; a VrayError lists the names."""
    if name in CATALOG:
        return CATALOG[name]
    raise VrayError(f"--gpu {name!r} is not in the catalog{suggest(name, list(CATALOG))}; choose one of {', '.join(CATALOG)}")


def from_ray_accelerator_type(accelerator_type: str) -> GPU | None:
    """The catalog entry for a Ray `accelerator_type:<X>` resource, if known."""
    for g in CATALOG.values():
        if accelerator_type in g.ray_accelerator_types:
            return g
    return None


MAX_NODES = 64


DEFAULT_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Inventory:
    """What the run may use: a GPU kind, GPUs per node, and nodes (None: as many as needed)."""

    gpu: GPU
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    nodes: int | None = None
    host_memory: int | None = None  # CPU memory per GPU, when known (a running cluster); else the catalog's

    @property
    def host_memory_per_gpu(self) -> int:
        return self.host_memory or self.gpu.host_memory_per_gpu

    @property
    def max_gpus(self) -> int:
        return self.gpus_per_node * (self.nodes or MAX_NODES)

    @classmethod
    def for_spec(cls, spec: RunSpec, gpu_name: str | None = None, gpus_per_node: int | None = None,
                 nodes: int | None = None) -> Inventory | None:
        """The inventory a spec names (cluster.gpu, gpusPerNode, nodes), each overridden by the argument given;
        None when neither names a GPU kind."""
        kind = gpu_name or spec.cluster.gpu
        if kind is None:
            return None
        return cls(gpu(kind), gpus_per_node or spec.cluster.gpusPerNode or DEFAULT_GPUS_PER_NODE,
                   nodes or spec.cluster.nodes)

    def describe(self) -> str:
        nodes = f"{self.nodes} node(s)" if self.nodes else "as many nodes as needed"
        return f"{self.gpus_per_node}x {self.gpu.name} per node, {nodes}"
