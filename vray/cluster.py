"""The machines a run may use: every command joins RAY_ADDRESS or a running local cluster, else starts a local
one; what GPUs the cluster (or this machine) has, and whether the cluster can place a plan."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vray.errors import VrayError
from vray.plan.gpus import CATALOG, GIB, GPU, Inventory
from vray.plan.plan import Plan
from vray.plan.planner import placement

# Ray's token authentication (https://docs.ray.io/en/latest/ray-security/token-auth.html): a local `ray.init()`
# turns it on and writes ~/.ray/auth_token, and `ray start --head` turns it on whenever a token already exists.
# A process that joins a cluster by address sends a token only under RAY_AUTH_MODE=token, so vray looks for one
# where Ray does, in Ray's order, and turns token mode on for itself when it finds one.
AUTH_MODE = "RAY_AUTH_MODE"
TOKEN_HELP = ("run `ray get-auth-token` on the head and save what it prints to ~/.ray/auth_token here (or set "
              "RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it); Ray's own CLI (`ray job submit`) "
              "also needs RAY_AUTH_MODE=token")


@dataclass(frozen=True)
class RayToken:
    """A Ray authentication token and where it was found (for messages; the value is never printed)."""
    value: str
    source: str

    def http_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_ray_token() -> RayToken | None:
    """The token Ray would use: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token.
    None when there is none, or when RAY_AUTH_MODE=disabled says not to send one."""
    if os.environ.get(AUTH_MODE, "").lower() == "disabled":
        return None
    value = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return RayToken(value, "RAY_AUTH_TOKEN")
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        # Ray aborts the process on a token path it cannot read: say so here instead
        try:
            value = Path(named).expanduser().read_text().strip()
        except OSError as exc:
            raise VrayError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read the Ray token ({exc.strerror or exc}); point "
                            "it at the file `ray get-auth-token` wrote, or unset it") from None
        if not value:
            raise VrayError(f"RAY_AUTH_TOKEN_PATH={named} is empty; point it at the file holding the cluster's token "
                            "(`ray get-auth-token` prints it), or unset it")
        return RayToken(value, f"RAY_AUTH_TOKEN_PATH ({named})")
    default = Path.home() / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return RayToken(value, str(default)) if value else None


def use_ray_token() -> RayToken | None:
    """The token this process will present, with Ray's token mode turned on for it when RAY_AUTH_MODE is unset and a
    token exists (what Ray does itself for a local cluster it finds, and not for one given by address)."""
    token = find_ray_token()
    mode = os.environ.get(AUTH_MODE, "").lower()
    if mode == "token" and token is None:
        raise VrayError(f"RAY_AUTH_MODE=token is set but no Ray token was found; {TOKEN_HELP}")
    if token is not None and not mode:
        os.environ[AUTH_MODE] = "token"
        _refresh_ray_auth()
    return token


def _refresh_ray_auth() -> None:
    """Make an already imported Ray read RAY_AUTH_MODE and the token again (Ray caches both per process)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def connection_refused(address: str, token: RayToken | None, exc: BaseException) -> VrayError:
    """The one-line error for a cluster that would not let this process join."""
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    if token is None:
        return VrayError(f"could not join the Ray cluster at {address} ({reason}). If it uses token authentication "
                         f"(Ray's default), {TOKEN_HELP}. Otherwise check the address and that the head is up")
    return VrayError(f"could not join the Ray cluster at {address} with the token from {token.source} ({reason}). "
                     f"If the head has another token, {TOKEN_HELP}. Otherwise check the address and that the head "
                     "is up")


_OWN_CLUSTER: str | None = None  # the GCS address of the local cluster this process started, if it did


def owns_cluster() -> bool:
    """Whether the Ray cluster this process is connected to is the local one it started (and that ends with it)."""
    import ray

    return ray.is_initialized() and _OWN_CLUSTER is not None and ray.get_runtime_context().gcs_address == _OWN_CLUSTER


@contextmanager
def _quiet_auth_warning() -> Iterator[None]:
    """Ray logs a warning of its own when a local cluster starts with token authentication; vray says it in one line."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    only_errors = logging.Filter()
    only_errors.filter = lambda record: record.levelno >= logging.ERROR  # type: ignore[method-assign]
    logger.addFilter(only_errors)  # a filter, since ray.init may set the logger's level itself
    try:
        yield
    finally:
        logger.removeFilter(only_errors)


def connect(address: str | None, **init_kwargs: Any) -> None:
    """`ray.init` for vray's commands: join the cluster at `address` with the token Ray documents, or start a local
    one (token authentication on, as Ray does by default); a cluster that refuses the connection is a VrayError."""
    import ray
    from ray.exceptions import AuthenticationError

    if address:
        token = use_ray_token()
        try:
            ray.init(address=address, **init_kwargs)
        except (ConnectionError, AuthenticationError) as exc:
            raise connection_refused(address, token, exc) from None
        return
    announce = AUTH_MODE not in os.environ
    with _quiet_auth_warning():
        ray.init(**init_kwargs)
    global _OWN_CLUSTER
    _OWN_CLUSTER = ray.get_runtime_context().gcs_address
    if announce and os.environ.get(AUTH_MODE) == "token":
        token = find_ray_token()
        where = token.source if token else "~/.ray/auth_token"
        print(f"vray: started a local Ray cluster with token authentication (the token is in {where}; "
              "`ray get-auth-token` prints it)", file=sys.stderr)


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
    connect(address or None, log_to_driver=verbose, configure_logging=True, logging_level="WARNING",
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
    env = dict(os.environ)
    if AUTH_MODE not in env:
        # token authentication, as a local ray.init() has: `ray start --head` turns it on only when a token exists
        if find_ray_token() is None:
            subprocess.run([exe, "get-auth-token", "--generate"], capture_output=True, text=True, check=False)
        env[AUTH_MODE] = "token" if find_ray_token() is not None else "disabled"
    proc = subprocess.run(
        [exe, "start", "--head", "--disable-usage-stats", "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise VrayError(f"`ray start --head` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")
    address = running_cluster_address()
    if address is None:
        raise VrayError("`ray start --head` ran but no cluster address was recorded")
    return address


# Settings a worker needs to reach storage and the hub, carried from the driver's environment; and the GPU
# settings a user tunes on the driver: NCCL (NCCL_*, TORCH_NCCL_*), libfabric for EFA (FI_*) and the CUDA allocator.
FORWARDED_ENV_PREFIXES = ("AWS_", "HF_", "HUGGING_FACE_", "VRAY_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_",
                          "NCCL_", "TORCH_NCCL_", "FI_", "PYTORCH_CUDA_ALLOC_CONF")

# What GPU workers get unless the driver's environment sets it: expandable segments cut the allocator's
# fragmentation (sharded engines allocate and free gathered parameters of varying sizes every step), and without
# record_stream the NCCL process group frees a collective's buffers when it completes instead of when the caching
# allocator next sees the stream idle.
GPU_ENV_DEFAULTS = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}


def forwarded_env(gpu: bool = False) -> dict[str, str]:
    """The driver's storage / hub / vray / NCCL / allocator environment variables, for the workers' runtime_env;
    with `gpu`, also GPU_ENV_DEFAULTS for those the driver leaves unset."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    if gpu:
        env = {**GPU_ENV_DEFAULTS, **env}
    return env


def joined_cluster() -> bool:
    """Whether this process's work runs on a Ray cluster it joins (its workers elsewhere, with an environment of
    their own), rather than on a local one it started or none: the one rule for where a check of what the workers
    can load belongs."""
    import ray

    if ray.is_initialized():
        return not owns_cluster()
    return running_cluster_address() is not None


def on_a_worker(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> Any:
    """`fn(*args)` in one Ray task of one CPU, on a node that runs the cluster's work and with the environment the
    workers get (`env`, by default `forwarded_env()`): for a check that must see what a worker sees (its cache, its
    network), not what the driver does. A VrayError it raises is raised here as itself. Ray must be up."""
    import ray

    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    env = forwarded_env() if env is None else env
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    result, error = ray.get(ray.remote(_result_or_error).options(**options).remote(fn, *args))
    if error is not None:
        raise error
    return result


def _result_or_error(fn: Callable[..., Any], *args: Any) -> tuple[Any, VrayError | None]:
    try:
        return fn(*args), None
    except VrayError as exc:  # a value across the task boundary: the driver raises it without Ray's wrapping
        return None, exc


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
        connect(address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    gpu_nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not gpu_nodes:
        # None alive (an autoscaling cluster at rest): the GPU node groups its autoscaler reported, if it did
        gpu_nodes = [{"Resources": dict(g.resources)} for g in _gpu_node_group_configs()
                     for _ in range(max(1, g.max_count))]
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


@dataclass(frozen=True)
class Capacity:
    """What the capacity check planned for: the GPUs it counted and where they come from."""

    source: str  # "alive": the GPU nodes up now; "autoscaler": those plus what it can add; "nodes": cluster.nodes
    alive_gpus: int
    added_gpus: int = 0  # GPUs beyond the alive ones (the autoscaler's, or the ones cluster.nodes promises)
    how: str = ""  # how the autoscaler's limit was read
    placement: tuple[int, ...] | None = None  # node index of each worker, when the nodes are known up front

    def describe(self) -> str:
        if self.source == "alive":
            return f"planned for the {self.alive_gpus} GPU(s) alive now"
        if self.source == "autoscaler":
            return (f"planned for {self.added_gpus} GPU(s) the autoscaler can add, beside the {self.alive_gpus} "
                    f"alive now ({self.how})")
        return (f"planned for --nodes (cluster.nodes): {self.alive_gpus} GPU(s) alive now, the autoscaler is trusted "
                f"to add {self.added_gpus} more ({self.how})")


# How long the capacity check waits for the autoscaler to judge the plan's placement group (it decides every
# few seconds: AUTOSCALER_UPDATE_INTERVAL_S, 5 s by default).
AUTOSCALER_ANSWER_S = 60.0


def check_cluster_capacity(plan: Plan, nodes: int | None = None,
                           answer_s: float = AUTOSCALER_ANSWER_S) -> Capacity:
    """Refuse, before anything starts, a GPU plan the connected Ray cluster cannot place, now or once its
    autoscaler has added nodes; otherwise say what it planned for.

    In order: the GPU nodes alive now; the autoscaler's node groups as the GCS cluster config records them
    (`ray._private.state.state.get_cluster_config()`, which Ray Train's own pre-start check reads); the verdict
    of an autoscaler v2 on the plan's placement group (it lists the groups no node type can hold as infeasible);
    and last `nodes` (cluster.nodes), trusted when the autoscaler's limits cannot be read."""
    import ray

    alive = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    try:
        return Capacity("alive", sum(alive), placement=tuple(placement(plan, alive)))
    except VrayError as refusal:
        refused_now = refusal
    needed = max(0, plan.num_workers - sum(alive))
    groups = autoscaler_gpu_groups()
    if groups is not None:
        addable = _addable(groups, alive, plan.num_workers)
        try:
            where = placement(plan, alive + addable)
        except VrayError:
            limits = ", ".join(f"{name}: up to {count if count >= 0 else 'any number of'} node(s) of {gpus} GPU(s)"
                               for name, gpus, count in groups) or "no GPU node group"
            raise VrayError(
                f"the plan needs {plan.num_workers} GPU(s) on {plan.nodes} node(s) of {plan.gpus_per_node}; the "
                f"cluster has {sum(alive)} GPU(s) alive and its autoscaler can add {sum(addable)} ({limits}); raise "
                "the GPU worker group's maxReplicas, or plan for this cluster with --from-cluster") from None
        return Capacity("autoscaler", sum(alive), sum(addable), "its node groups in the GCS cluster config",
                        tuple(where))
    verdict = ask_autoscaler(plan, answer_s)
    if verdict is True:
        return Capacity("autoscaler", sum(alive), needed, "it accepted the plan's placement group")
    if verdict is False:
        raise VrayError(
            f"the plan needs {plan.num_workers} GPU(s) on {plan.nodes} node(s) of {plan.gpus_per_node}; the cluster "
            f"has {sum(alive)} GPU(s) alive and its autoscaler reports the plan's placement group as infeasible (no "
            "node type it may add holds it, or maxReplicas is reached); raise the GPU worker group's maxReplicas, "
            "or plan for this cluster with --from-cluster")
    if nodes is not None and plan.nodes <= nodes:
        return Capacity("nodes", sum(alive), needed, "the autoscaler's limits could not be read")
    raise refused_now


def autoscaler_gpu_groups() -> list[tuple[str, int, int]] | None:
    """(name, GPUs per node, max nodes; -1 for no bound) of each GPU node group the autoscaler may add, from the
    cluster config an autoscaler reports to the GCS; None when none was reported (the open-source autoscalers of
    Ray 2.60 do not report it), [] when the autoscaler may add no GPU node."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [(g.name, int(g.resources["GPU"]), int(g.max_count)) for g in _gpu_node_group_configs(config)]


def _gpu_node_group_configs(config: Any = None) -> list[Any]:
    """The NodeGroupConfig entries of the GCS cluster config that add GPU nodes."""
    if config is None:
        from ray._private.state import state

        config = state.get_cluster_config()
    if config is None:
        return []
    return [g for g in config.node_group_configs if g.resources.get("GPU", 0) > 0 and g.max_count != 0]


def _addable(groups: list[tuple[str, int, int]], alive: list[int], workers: int) -> list[int]:
    """GPU counts of the nodes the autoscaler may still add: each group's maximum less its nodes alive now (an
    alive node with a group's GPU count is taken to be one of that group's)."""
    taken = list(alive)
    out: list[int] = []
    for _name, gpus, count in groups:
        mine = sum(1 for g in taken if g == gpus)
        taken = [g for g in taken if g != gpus]
        extra = -(-workers // gpus) if count < 0 else max(0, count - mine)
        out += [gpus] * extra
    return out


def ask_autoscaler(plan: Plan, answer_s: float = AUTOSCALER_ANSWER_S) -> bool | None:
    """The autoscaler's verdict on the plan's placement group: True when it can be placed (now, or on the nodes
    the autoscaler then launches), False when the autoscaler reports it infeasible; None when no autoscaler v2
    reports to this cluster's GCS, or it did not judge within `answer_s`.

    The group is the one Ray Train reserves (plan.bundles(), the plan's strategy) and is removed before
    returning; the nodes it made the autoscaler launch serve the run that follows. The verdict is read from the
    GCS GetClusterStatus reply (`AutoscalingState.infeasible_gang_resource_requests`, each named by its placement
    group id): `ray.autoscaler.v2.sdk.get_cluster_status` parses the same reply but leaves the infeasible requests
    out."""
    import time

    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    gcs = GcsClient(ray.get_runtime_context().gcs_address)

    def status() -> GetClusterStatusReply:
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
        return reply

    if status().autoscaling_state.autoscaler_state_version == 0:
        return None  # no autoscaler v2 has reported
    pg = placement_group(plan.bundles(), strategy=plan.scaling_config["placement_strategy"])
    pg_id = pg.id.hex()
    try:
        seen_in: int | None = None  # the cluster state version that first lists the group
        deadline = time.monotonic() + answer_s
        while time.monotonic() < deadline:
            if placement_group_table(pg).get("state") == "CREATED":
                return True
            reply = status()
            autoscaler, cluster = reply.autoscaling_state, reply.cluster_resource_state
            if any(g.details.startswith(pg_id) for g in autoscaler.infeasible_gang_resource_requests):
                return False
            if seen_in is None and any(g.details.startswith(pg_id) for g in cluster.pending_gang_resource_requests):
                seen_in = cluster.cluster_resource_state_version
            if seen_in is not None and autoscaler.last_seen_cluster_resource_state_version >= seen_in:
                return True  # the autoscaler has judged a state holding the group, and not found it infeasible
            time.sleep(0.5)
        return None
    finally:
        remove_placement_group(pg)


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
