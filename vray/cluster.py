"""The machines a run may use: every command joins RAY_ADDRESS or a running local cluster, else starts a local
one; what GPUs the cluster (or this machine) has, and whether the cluster can place a plan."""

from __future__ import annotations

import os
import shutil
import subprocess

from vray.errors import VrayError
from vray.plan.gpus import CATALOG, GIB, GPU, Inventory
from vray.plan.plan import Plan
from vray.plan.planner import placement


def ensure_ray(verbose: bool = False) -> None:
    """Join RAY_ADDRESS or a running local cluster; start a local one otherwise."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    address = os.environ.get("RAY_ADDRESS") or running_cluster_address()
    kwargs = {}
    if not address:
        # A local cluster of this machine: two logical CPUs beyond the cores, so the data-preprocessing actors
        # and a Serve replica find room beside training workers that take a core each.
        kwargs["num_cpus"] = (os.cpu_count() or 1) + 2
    ray.init(address=address or None, log_to_driver=verbose, configure_logging=True, logging_level="WARNING",
             include_dashboard=False, **kwargs)


def running_cluster_address() -> str | None:
    """The address of a Ray cluster this process would join (RAY_ADDRESS or a local `ray start`), if any."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    from ray._private.services import find_bootstrap_address

    return find_bootstrap_address(None)


def start_persistent_head() -> str:
    """`ray start --head` on this machine (for work that outlives this process, like a detached server)."""
    exe = shutil.which("ray")
    if exe is None:
        raise VrayError("the `ray` command is not on PATH; install vray into the active environment")
    proc = subprocess.run(
        [exe, "start", "--head", "--disable-usage-stats", "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise VrayError(f"`ray start --head` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    address = running_cluster_address()
    if address is None:
        raise VrayError("`ray start --head` ran but no cluster address was recorded")
    return address


# Settings a worker needs to reach storage and the hub, carried from the driver's environment.
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "HUGGING_FACE_", "VRAY_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_")


def forwarded_env() -> dict[str, str]:
    """The driver's storage / hub / vray environment variables, for the workers' runtime_env."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def inventory_from_cluster(address: str | None, gpu_name: str | None = None) -> Inventory:
    """The GPU inventory of a running Ray cluster (GPU kind from its accelerator_type resources)."""
    inventory = cluster_gpu_inventory(address, gpu_name)
    if inventory is None:
        raise VrayError(f"the Ray cluster at {address} has no GPU nodes; `vray train` plans CPU workers there")
    return inventory


def cluster_gpu_inventory(address: str | None, gpu_name: str | None = None) -> Inventory | None:
    """The GPU inventory of the Ray cluster at `address` (None: the one this process is connected to, or
    would join); None when it has no GPUs."""
    import ray

    from vray.plan.gpus import from_ray_accelerator_type
    from vray.plan.gpus import gpu as catalog_gpu

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    gpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not gpu_nodes:
        return None
    counts = sorted({int(n["Resources"]["GPU"]) for n in gpu_nodes})
    kinds = sorted({k.split(":", 1)[1] for n in gpu_nodes for k in n["Resources"] if k.startswith("accelerator_type:")})
    if gpu_name:
        kind = catalog_gpu(gpu_name)
    else:
        known = [g for g in (from_ray_accelerator_type(k) for k in kinds) if g is not None]
        if len({g.name for g in known}) != 1:
            raise VrayError(
                f"the cluster at {address} reports accelerator types {kinds or 'none'}; name the GPU with --gpu "
                f"(one of {', '.join(CATALOG)})"
            )
        kind = known[0]
    per_gpu_memory = min(int(n["Resources"].get("memory", 0) / n["Resources"]["GPU"]) for n in gpu_nodes)
    return Inventory(kind, gpus_per_node=max(counts), nodes=len(gpu_nodes), host_memory=per_gpu_memory or None)


def check_cluster_capacity(plan: Plan) -> list[int]:
    """Refuse, before anything starts, a GPU plan the connected Ray cluster cannot place; returns the
    node index of each worker otherwise."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return placement(plan, [int(n["Resources"].get("GPU", 0)) for n in nodes])


def in_ray_train_worker() -> bool:
    """Whether this process is a Ray Train worker (with a train context)."""
    try:
        import ray
        import ray.train

        return ray.is_initialized() and ray.train.get_context() is not None
    except Exception:  # noqa: BLE001 - no Ray, or not inside a Ray Train worker
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (for a process group, a head or a server)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_gpu() -> tuple[GPU, int] | None:
    """(catalog entry, count) of this machine's CUDA GPUs, or None without any."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = torch.cuda.get_device_properties(0)
    name = props.name.upper()
    family = next((f for f in ("B200", "H200", "H100", "A100", "A10G", "L4", "T4") if f in name), None)
    matches = [g for g in CATALOG.values() if family and g.name.startswith(family)]
    if matches:  # the variant whose memory is closest to what the device reports
        best = min(matches, key=lambda g: abs(g.memory_bytes - props.total_memory))
        return best, torch.cuda.device_count()
    bf16 = torch.cuda.is_bf16_supported()
    return GPU(props.name, props.total_memory, bf16, 100.0, "pcie", 64 * GIB), torch.cuda.device_count()
