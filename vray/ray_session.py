"""Connecting to Ray: every command joins RAY_ADDRESS or a running local cluster, else starts a local one."""

from __future__ import annotations

import os
import shutil
import subprocess

from vray.errors import VrayError


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
