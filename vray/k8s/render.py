"""KubeRay manifests from a run spec and its plan: a RayCluster, a RayJob that trains the spec, a RayService
that serves the trained run.

The head takes no work (`num-cpus: "0"`); GPU workers come in one group sized from the plan (GPUs per pod, pods,
`nvidia.com/gpu` limits, the NVIDIA toleration, shared memory for NCCL, a per-pod model cache that every worker
process of the pod shares, so weights are fetched once per node). The cluster autoscales with autoscaler v2
between `minReplicas` and `maxReplicas`. Every manifest is checked against the KubeRay CRD schemas.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vray import __version__
from vray.errors import VrayError
from vray.plan.gpus import GPU
from vray.plan.plan import Plan
from vray.spec import RunSpec
from vray.storage.shared import require_shared_storage

API_VERSION = "ray.io/v1"
DEFAULT_IMAGE = f"vray:{__version__}"  # built from cluster/Dockerfile
SECRET = "vray-secrets"  # keys: hf-token, aws-access-key-id, aws-secret-access-key, api-key
CACHE = "/home/ray/.cache"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
KINDS = ("raycluster", "rayjob", "rayservice")
# Ray token authentication (KubeRay >= 1.5.1, Ray >= 2.52): the operator creates a Secret named after the cluster
# holding a random token and sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from that Secret) on every Ray container,
# the autoscaler, and a RayJob's submitter; its own dashboard client sends the token too.
AUTH_OPTIONS = {"mode": "token"}


def ray_version() -> str:
    """The Ray version the manifests ask KubeRay for: the one vray runs with."""
    from importlib.metadata import version

    return version("ray")


def k8s_name(text: str) -> str:
    """A DNS-1123 label from any text (lower case, '-' for the rest, at most 50 so KubeRay's suffixes fit)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", name)[:50].strip("-") or "vray"


@dataclass(frozen=True)
class RenderOptions:
    """What the manifests need besides the spec and plan."""

    name: str
    spec_ref: str  # the spec's path inside the image or working_dir, as the entrypoint names it
    image: str = DEFAULT_IMAGE
    namespace: str | None = None
    working_dir: str | None = None  # a runtime_env working_dir URL (zip on S3 / https); default: the image's
    cluster_selector: str | None = None  # run the RayJob on this existing RayCluster instead of its own
    ttl_seconds: int = 3600
    efa: int = 0  # EFA interfaces per GPU pod (vpc.amazonaws.com/efa), for NCCL over aws-ofi-nccl
    rdma: tuple[tuple[str, int], ...] = ()  # (device-plugin resource, count) per GPU pod, for NCCL over InfiniBand
    overrides: tuple[str, ...] = ()  # `--set KEY=VALUE` given to the renderer: the RayJob trains with them too


EFA_RESOURCE = "vpc.amazonaws.com/efa"
# libfabric's EFA provider with GPUDirect RDMA (the aws-ofi-nccl plugin of cluster/Dockerfile's EFA build carries
# NCCL over it); fork-safe, as data loaders and Ray's workers fork.
EFA_ENV = (("FI_PROVIDER", "efa"), ("FI_EFA_USE_DEVICE_RDMA", "1"), ("FI_EFA_FORK_SAFE", "1"))
# NCCL's InfiniBand transport, forced: a pod whose devices are missing fails at once instead of falling back to TCP.
RDMA_ENV = (("NCCL_NET", "IB"), ("NCCL_IB_DISABLE", "0"))
_RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def parse_rdma(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """`--rdma RESOURCE=COUNT` values (e.g. rdma/rdma_shared_device_a=1) as (resource, count) pairs."""
    out = []
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not _RESOURCE_NAME.match(name) or not count.isdigit() or int(count) < 1:
            raise VrayError(f"--rdma {item!r}: use RESOURCE=COUNT with the device plugin's resource name and a "
                            "count of at least 1, e.g. --rdma rdma/rdma_shared_device_a=1")
        out.append((name, int(count)))
    return tuple(out)


def network_devices(opts: RenderOptions) -> tuple[dict[str, str], list[dict[str, Any]], bool]:
    """(extra container limits, extra env, whether the container needs IPC_LOCK) for the GPU pods' network
    devices."""
    if opts.efa < 0:
        raise VrayError(f"--efa {opts.efa}: give the number of EFA interfaces per GPU pod (at least 1)")
    limits: dict[str, str] = {}
    env: list[dict[str, Any]] = []
    if opts.efa:
        limits[EFA_RESOURCE] = str(opts.efa)
        env += [{"name": k, "value": v} for k, v in EFA_ENV]
    for name, count in opts.rdma:
        limits[name] = str(count)
    if opts.rdma:
        env += [{"name": k, "value": v} for k, v in RDMA_ENV]
    return limits, env, bool(opts.rdma)


def _env(spec: RunSpec, serve: bool = False) -> list[dict[str, Any]]:
    def secret(var: str, key: str, optional: bool = True) -> dict[str, Any]:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key, "optional": optional}}}

    env = [{"name": "HF_HOME", "value": f"{CACHE}/huggingface"}, {"name": "VRAY_CACHE", "value": f"{CACHE}/vray"},
           secret("HF_TOKEN", "hf-token"), secret("AWS_ACCESS_KEY_ID", "aws-access-key-id"),
           secret("AWS_SECRET_ACCESS_KEY", "aws-secret-access-key")]
    if spec.output or "://" in spec.storage:  # the pods write the run where vray train here would (RunSpec.storage)
        env.insert(0, {"name": "VRAY_STORAGE", "value": spec.storage})
    if serve:
        env.append(secret("VRAY_API_KEY", "api-key", optional=False))
    return env


def _meta(opts: RenderOptions, suffix: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": k8s_name(opts.name + suffix),
                            "labels": {"app.kubernetes.io/name": "vray", "app.kubernetes.io/instance": k8s_name(opts.name),
                                       "app.kubernetes.io/version": __version__}}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    return meta


def _head(image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    ports = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000), ("metrics", 8080)]
    return {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"},
        "template": {"spec": {"containers": [{
            "name": "ray-head", "image": image,
            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
            "ports": [{"name": n, "containerPort": p} for n, p in ports],
            "env": env,
            "volumeMounts": [{"name": "model-cache", "mountPath": CACHE}],
        }], "volumes": [{"name": "model-cache", "emptyDir": {}}]}},
    }


def _worker_group(gpu: GPU | None, gpus_per_pod: int, pods: int, min_pods: int, max_pods: int, image: str,
                  env: list[dict[str, Any]], cpus_per_pod: int,
                  devices: tuple[dict[str, str], list[dict[str, Any]], bool] = ({}, [], False),
                  resources: dict[str, str] | None = None) -> dict[str, Any]:
    extra_limits, extra_env, ipc_lock = devices
    if gpu is not None:
        memory_gib = max(16, int(gpu.host_memory_per_gpu * gpus_per_pod * 0.85 / 2**30))
        limits = {"cpu": str(cpus_per_pod), "memory": f"{memory_gib}Gi", "nvidia.com/gpu": str(gpus_per_pod),
                  **extra_limits}
        group = f"gpu-{k8s_name(gpu.name)}"
    else:
        limits = {"cpu": str(cpus_per_pod), "memory": f"{max(4, 4 * cpus_per_pod)}Gi"}
        group = "cpu"
    container: dict[str, Any] = {
        "name": "ray-worker", "image": image,
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        # the head's list as it is (one YAML anchor), or a copy with the network devices' settings
        "env": copy.deepcopy(env) + extra_env if extra_env else env,
        # one cache per pod (node): every worker process there reads the weights fetched once
        "volumeMounts": [{"name": "model-cache", "mountPath": CACHE}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if ipc_lock:  # RDMA registers (pins) memory
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "model-cache", "emptyDir": {}}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpu is not None:
        pod["tolerations"] = [dict(GPU_TOLERATION)]
    out: dict[str, Any] = {"groupName": group, "replicas": pods, "minReplicas": min_pods, "maxReplicas": max_pods,
                           "numOfHosts": 1, "rayStartParams": {}, "template": {"spec": pod}}
    if resources:  # Ray resources the pods start with, which the autoscaler counts before a pod exists
        out["resources"] = dict(resources)
    return out


def cluster_spec(plan: Plan, spec: RunSpec, opts: RenderOptions, gpu: GPU | None, serve: bool = False,
                 pods: tuple[int, int, int] | None = None, gpus_per_pod: int | None = None,
                 resources: dict[str, str] | None = None) -> dict[str, Any]:
    """A RayCluster spec: head without work, one worker group sized from the plan (or for serving replicas, with
    the Ray `resources` they ask for), Ray token authentication on (`AUTH_OPTIONS`)."""
    env = _env(spec, serve)
    devices: tuple[dict[str, str], list[dict[str, Any]], bool] = ({}, [], False)
    if not serve:  # serving replicas run no collectives across pods
        devices = network_devices(opts)
        if devices[0] and gpu is None:
            raise VrayError("--efa / --rdma: network devices go to GPU worker pods; this plan runs CPU workers "
                            "(name the GPU with --gpu)")
    if gpu is not None:
        per_pod = gpus_per_pod or min(plan.gpus_per_node, plan.num_workers)
        count = math.ceil(plan.num_workers / per_pod)
        replicas, low, high = pods or (count, 0, count)
        cpus = min(8 * per_pod, 96)
    else:
        per_pod = 0
        replicas, low, high = pods or (plan.num_workers, 0, plan.num_workers)
        cpus = plan.cpus_per_worker + 1
    return {
        "rayVersion": ray_version(),
        "authOptions": dict(AUTH_OPTIONS),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 300},
        "headGroupSpec": _head(opts.image, env),
        "workerGroupSpecs": [_worker_group(gpu, per_pod, replicas, low, high, opts.image, env, cpus, devices,
                                           resources)],
    }


def training_pods(plan: Plan) -> int:
    """Worker pods the training runs on: a GPU plan packs a node's GPUs into one pod; a CPU plan runs one pod per
    worker."""
    if plan.device == "gpu":
        return math.ceil(plan.num_workers / max(1, min(plan.gpus_per_node, plan.num_workers)))
    return plan.num_workers


def raycluster(plan: Plan, spec: RunSpec, opts: RenderOptions, gpu: GPU | None) -> dict[str, Any]:
    """A RayCluster for the plan (what `ray job submit` then targets)."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _meta(opts),
            "spec": cluster_spec(plan, spec, opts, gpu)}


def entrypoint(opts: RenderOptions, run_name: str) -> str:
    """The RayJob's command: train the spec with the renderer's `--set` overrides (the spec the manifests were
    planned for), under a fixed run name (so serving can find the run)."""
    sets = [f"--set {shlex.quote(o)}" for o in opts.overrides if o.partition("=")[0].strip() != "name"]
    return " ".join(["vray train", shlex.quote(opts.spec_ref), *sets, f"--set {shlex.quote(f'name={run_name}')}"])


def rayjob(plan: Plan, spec: RunSpec, opts: RenderOptions, gpu: GPU | None, run_name: str) -> dict[str, Any]:
    """A RayJob that trains the spec: on its own cluster (deleted after the job) or on an existing one."""
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if opts.working_dir:
        runtime_env["working_dir"] = opts.working_dir
    job: dict[str, Any] = {
        "entrypoint": entrypoint(opts, run_name),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=True),
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,
    }
    if opts.cluster_selector:
        job["clusterSelector"] = {"ray.io/cluster": opts.cluster_selector}
        job["shutdownAfterJobFinishes"] = False  # never delete a cluster the job did not create
    else:
        job["rayClusterSpec"] = cluster_spec(plan, spec, opts, gpu)
        job["shutdownAfterJobFinishes"] = True
        job["ttlSecondsAfterFinished"] = opts.ttl_seconds
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _meta(opts, "-train"), "spec": job}


def replica_resources(actor_options: dict[str, Any]) -> dict[str, str]:
    """The Ray resources a serving replica asks for beyond CPUs and GPUs, which its worker group must declare: the
    KubeRay autoscaler sizes a group from its pods' CPU / GPU limits and its `resources`, and Ray adds only the bare
    GPU name (`accelerator_type:A100`) to a node by itself, never the sized one a replica asks for (A100-80G)."""
    kind = actor_options.get("accelerator_type")
    return {f"accelerator_type:{kind}": "1"} if kind else {}


def rayservice(plan: Plan, spec: RunSpec, opts: RenderOptions, run_uri: str, run_name: str) -> dict[str, Any]:
    """A RayService serving the trained run (`<output>/<name>`) with the run's serving block."""
    from vray.infer.target import run_target
    from vray.plan.gpus import gpu as gpu_named
    from vray.serve.config import AppArgs, vray_application

    # The run is not trained yet: the target has no checkpoint; the deployment resolves the run when it starts.
    app = AppArgs(target=run_uri)
    target = run_target(spec, plan, name=run_name)
    options = app.options(target, api_key=None)
    application = vray_application(app, options)
    serve_config = {"applications": [application]}
    s = options.serving
    replica = options.replica
    gpu = gpu_named(replica.gpu) if replica.gpu else None
    cluster = cluster_spec(plan, spec, opts, gpu, serve=True, pods=(max(s.minReplicas, 1), s.minReplicas, s.maxReplicas),
                           gpus_per_pod=replica.num_gpus or None,
                           resources=replica_resources(replica.ray_actor_options()))
    body = {"serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False), "rayClusterConfig": cluster}
    return {"apiVersion": API_VERSION, "kind": "RayService", "metadata": _meta(opts, "-serve"), "spec": body}


def render(spec: RunSpec, plan: Plan, opts: RenderOptions, kinds: tuple[str, ...] = KINDS,
           validate: bool = True) -> dict[str, dict[str, Any]]:
    """{kind: manifest} for the spec and its plan, each checked against the KubeRay CRDs."""
    from vray.plan.gpus import gpu as gpu_named

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise VrayError(f"--kind {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    if not plan.fits:
        raise VrayError(f"the run does not fit: {plan.reason}; see `vray plan` for suggestions")
    gpu = gpu_named(plan.gpu) if plan.device == "gpu" and plan.gpu else None
    run_name = spec.name or opts.name
    run_uri = spec.run_dir_of(run_name)
    require_shared_storage(run_uri, training_pods(plan), mounts_of_this_machine=False)
    out: dict[str, dict[str, Any]] = {}
    if "raycluster" in kinds:
        out["raycluster"] = raycluster(plan, spec, opts, gpu)
    if "rayjob" in kinds:
        out["rayjob"] = rayjob(plan, spec, opts, gpu, run_name)
    if "rayservice" in kinds:
        if "://" not in run_uri:
            raise VrayError("a RayService reads the trained run from storage every pod can reach; set output: "
                            "s3://BUCKET/runs in the spec")
        out["rayservice"] = rayservice(plan, spec, opts, run_uri, run_name)
    if validate:
        from vray.k8s.validate import check_manifest

        for kind, manifest in out.items():
            check_manifest(manifest, f"the rendered {manifest['kind']}")
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as literal blocks, readable in the manifest."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: dict[str, Any], command: str) -> str:
    """A manifest file: a header with the command that renders it, then the YAML."""
    return f"# Rendered by vray {__version__}: {command}\n# Regenerate it rather than editing it.\n" + \
        yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


def write(manifests: dict[str, dict[str, Any]], folder: str | Path, source: str) -> list[Path]:
    """Write `<folder>/<kind>.yaml` for each manifest."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, manifest in manifests.items():
        path = out / f"{kind}.yaml"
        path.write_text(to_yaml(manifest, source))
        paths.append(path)
    return paths
