"""KubeRay: RayCluster / RayJob / RayService manifests rendered from a run spec and its plan, validated against the
KubeRay CRD schemas."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vray.errors import VrayError


@dataclass(frozen=True)
class Rendered:
    """The manifests of one spec on one kind of node, and the command that renders them."""

    folder: Path
    manifests: dict[str, dict[str, Any]]
    command: str


def render_spec(spec_file: str, gpu: str | None, gpus_per_node: int | None = None, nodes: int | None = None,
                kinds: tuple[str, ...] | None = None, image: str | None = None, name: str | None = None,
                namespace: str | None = None, working_dir: str | None = None, cluster_selector: str | None = None,
                overrides: list[str] | None = None, efa: int = 0,
                rdma: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, Any]], str]:
    """Plan `spec_file` for `gpus_per_node` x `gpu` nodes and render its manifests; also the command line that
    does the same (written into each file's header)."""
    from vray.data.io import count_rows
    from vray.k8s.render import DEFAULT_IMAGE, KINDS, RenderOptions, k8s_name, parse_rdma, render
    from vray.plan.gpus import Inventory
    from vray.plan.planner import cpu_plan, plan_run
    from vray.spec import load_spec

    devices = parse_rdma(rdma)  # a bad flag is refused before any planning
    spec = load_spec(Path(spec_file), overrides=overrides or [])
    inventory = Inventory.for_spec(spec, gpu, gpus_per_node, nodes)
    kind = gpu or spec.cluster.gpu  # as given: the command line written into the manifests
    plan = plan_run(spec, inventory, count_rows(spec.data.train)) if inventory else cpu_plan(spec)
    stem = Path(spec_file).stem
    opts = RenderOptions(name=name or spec.name or k8s_name(stem), spec_ref=spec_file, image=image or DEFAULT_IMAGE,
                         namespace=namespace, working_dir=working_dir, cluster_selector=cluster_selector,
                         efa=efa, rdma=devices, overrides=tuple(overrides or ()))
    chosen = tuple(kinds or KINDS)
    if kinds is None and "://" not in spec.storage:
        chosen = ("raycluster", "rayjob")  # a RayService needs the run in shared storage
    command = " ".join(["vray k8s render", spec_file] + ([f"--gpu {kind}"] if kind else [])
                       + ([f"--gpus-per-node {gpus_per_node}"] if gpus_per_node else [])
                       + ([f"--nodes {nodes}"] if nodes else []) + ([f"--efa {efa}"] if efa else [])
                       + [f"--rdma {r}" for r in rdma] + [f"--set {shlex.quote(o)}" for o in overrides or ()]
                       + [f"--kind {k}" for k in chosen])
    return render(spec, plan, opts, chosen), command


def read_catalog(path: str | Path) -> list[dict[str, Any]]:
    """The entries of cluster/manifests.yaml: what each folder of cluster/ is rendered from."""
    entries = yaml.safe_load(Path(path).read_text()) or []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "spec" not in e or "folder" not in e:
            raise VrayError(f"{path}: entry {i} needs 'spec' and 'folder' (and gpu, gpusPerNode, nodes, efa, rdma, kinds)")
    return entries


def render_catalog(path: str | Path, root: str | Path = ".") -> list[Rendered]:
    """Render every entry of a catalog (paths relative to `root`, the repository)."""
    out = []
    for e in read_catalog(path):
        manifests, command = render_spec(e["spec"], e.get("gpu"), e.get("gpusPerNode"), e.get("nodes"),
                                         tuple(e["kinds"]) if e.get("kinds") else None, efa=e.get("efa") or 0,
                                         rdma=tuple(e.get("rdma") or ()))
        out.append(Rendered(Path(root) / e["folder"], manifests, command))
    return out
