"""KubeRay manifests: every jobs/ spec plans, the rendered manifests validate strictly against the CRD schemas and
match cluster/, and multi-node runs need shared storage."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from tests.conftest import REPO, run_cli
from vray.errors import VrayError

JOBS = sorted((REPO / "jobs").glob("*.yaml"))
CATALOG = REPO / "cluster" / "manifests.yaml"


@pytest.fixture(scope="module")
def rendered():
    from vray.k8s import render_catalog

    cwd = os.getcwd()
    os.chdir(REPO)  # catalog paths are relative to the repository
    try:
        return render_catalog(CATALOG, REPO)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_every_job_spec_plans(path):
    from vray.plan.gpus import Inventory, gpu
    from vray.plan.planner import cpu_plan, plan_run
    from vray.spec import load_spec

    spec = load_spec(path)
    if spec.cluster.gpu is None:
        plan = cpu_plan(spec)
        assert path.name == "tiny-cpu.yaml" and plan.num_workers == 1
        return
    plan = plan_run(spec, Inventory(gpu(spec.cluster.gpu), spec.cluster.gpusPerNode, spec.cluster.nodes))
    assert plan.fits, plan.reason
    if spec.trainingMode.type == "Full" and spec.arch.size in ("32B", "35B-A3B"):
        assert plan.nodes > 1 and spec.output.startswith("s3://")  # spread across nodes, on shared storage


def test_jobs_cover_every_architecture_at_its_recommended_size():
    from vray.archs import registry
    from vray.spec import load_spec

    specs = [load_spec(p) for p in JOBS]
    have = {(s.architecture.name, s.architecture.size) for s in specs}
    for arch in registry.ARCHITECTURES:
        if arch.recommended:
            assert (arch.name, arch.size) in have, f"jobs/ has no spec for {arch.name} {arch.size}"
    assert ("qwen3vl", "32B") in have and ("qwen3.5", "35B-A3B") in have


def test_rendered_manifests_validate_strictly_and_follow_the_plan(rendered):
    from ray.serve.schema import ServeDeploySchema

    from vray.k8s.validate import validate_manifest

    kinds = {(r.folder.name, k) for r in rendered for k in r.manifests}
    assert ("qwen3-vl-8b-lora-serve", "rayservice") in kinds
    for r in rendered:
        for kind, m in r.manifests.items():
            assert validate_manifest(m) == [], (r.folder, kind)
            cluster = m["spec"].get("rayClusterSpec") or m["spec"].get("rayClusterConfig") or m["spec"]
            assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
            assert cluster["autoscalerOptions"]["version"] == "v2" and cluster["enableInTreeAutoscaling"]
            (group,) = cluster["workerGroupSpecs"]
            pod = group["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            if kind == "rayjob":
                spec = m["spec"]
                assert spec["entrypoint"].startswith("vray train jobs/") and spec["shutdownAfterJobFinishes"] is True
                assert spec["ttlSecondsAfterFinished"] > 0 and yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
            if kind == "rayservice":
                config = yaml.safe_load(m["spec"]["serveConfigV2"])
                ServeDeploySchema.model_validate(config)
                assert config["applications"][0]["args"]["target"] == "s3://vray-runs/qwen3-vl-8b-lora"
    multi = next(r for r in rendered if r.folder.name.startswith("qwen3-vl-32b-full"))
    group = multi.manifests["raycluster"]["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] > 1 and group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_cluster_folder_is_what_the_renderer_writes_today(rendered):
    from vray.k8s.render import to_yaml

    for r in rendered:
        for kind, manifest in r.manifests.items():
            path = r.folder / f"{kind}.yaml"
            assert path.exists(), f"{path} is missing; run `vray k8s render --catalog cluster/manifests.yaml`"
            assert path.read_text() == to_yaml(manifest, r.command), \
                f"{path} is stale; run `vray k8s render --catalog cluster/manifests.yaml`"


def test_the_validator_rejects_what_kubectl_strict_would(rendered):
    from vray.k8s.validate import validate_manifest

    bad = copy.deepcopy(rendered[0].manifests["raycluster"])
    bad["spec"]["workerGroupSpecs"][0]["gpus"] = 8  # unknown field
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    bad["spec"]["autoscalerOptions"]["version"] = "v3"
    del bad["spec"]["workerGroupSpecs"][0]["template"]
    bad["metadata"]["name"] = "Not_A_Name"
    errors = "\n".join(validate_manifest(bad))
    for needle in ("workerGroupSpecs[0].gpus: unknown field", "containerPort: expected integer",
                   "'v3' is not one of", "workerGroupSpecs[0].template: required", "metadata.name"):
        assert needle in errors
    assert validate_manifest({"apiVersion": "ray.io/v1", "kind": "Deployment"}) != []


def test_crds_from_a_kubectl_dump_named_by_the_environment(tmp_path, monkeypatch, rendered):
    from vray.k8s import validate

    items = [doc for f in sorted(validate.PACKAGED.iterdir()) for doc in validate._documents(f)]
    (tmp_path / "crds.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    monkeypatch.setenv("VRAY_KUBERAY_CRDS", str(tmp_path))
    validate.load_crds.cache_clear()
    try:
        assert validate.default_crd_folder() == tmp_path
        assert validate.validate_manifest(rendered[0].manifests["rayjob"]) == []
        (tmp_path / "crds.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items[:1]}))
        validate.load_crds.cache_clear()
        with pytest.raises(VrayError, match="no CRD for RayJob, RayService"):
            validate.load_crds()
    finally:
        validate.load_crds.cache_clear()


def test_the_packaged_crds_are_kuberays_own():
    import gzip

    from vray.k8s.validate import PACKAGED

    shared = REPO.parent / "shared" / "kuberay-crds"
    if not shared.is_dir():
        pytest.skip("no ../shared/kuberay-crds beside the repository")
    for original in sorted(shared.glob("*.yaml")):
        assert gzip.decompress((PACKAGED / f"{original.name}.gz").read_bytes()) == original.read_bytes()


def test_k8s_render_cli_writes_files_and_refuses_node_local_multinode_runs(tmp_path):
    proc = run_cli("k8s", "render", "jobs/qwen3.5-4b-lora.yaml", "--gpu", "L4-24GB", "--gpus-per-node", "1",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
    proc = run_cli("k8s", "render", "jobs/qwen3-vl-32b-full.yaml", "--set", "output=/home/ray/runs")
    assert proc.returncode == 1 and "s3://BUCKET/runs" in proc.stderr


def test_efa_and_rdma_devices_go_to_the_gpu_workers_and_validate(rendered, monkeypatch):
    from vray.k8s import render_spec
    from vray.k8s.render import to_yaml
    from vray.k8s.validate import validate_manifest

    monkeypatch.chdir(REPO)
    spec, gpu = "jobs/qwen3-vl-32b-full.yaml", "A100-40GB"
    manifests, command = render_spec(spec, gpu, 8, kinds=("raycluster", "rayjob"), efa=4,
                                     rdma=("rdma/rdma_shared_device_a=1",))
    assert "--efa 4 --rdma rdma/rdma_shared_device_a=1" in command
    plain = next(r for r in rendered if r.folder.name == "qwen3-vl-32b-full-8xA100-40GB").manifests
    for kind, m in manifests.items():
        assert validate_manifest(m) == [], kind
        cluster = m["spec"].get("rayClusterSpec") or m["spec"]
        (group,) = cluster["workerGroupSpecs"]
        (container,) = group["template"]["spec"]["containers"]
        for side in ("requests", "limits"):
            assert container["resources"][side]["vpc.amazonaws.com/efa"] == "4"
            assert container["resources"][side]["rdma/rdma_shared_device_a"] == "1"
            assert container["resources"][side]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1" and env["NCCL_NET"] == "IB"
        assert container["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
        # the head is as without devices: no device requests, no NCCL settings
        plain_cluster = plain[kind]["spec"].get("rayClusterSpec") or plain[kind]["spec"]
        assert cluster["headGroupSpec"] == plain_cluster["headGroupSpec"]
        assert "FI_PROVIDER" not in to_yaml(cluster["headGroupSpec"], command)
    # an EFA-only render asks for no RDMA device and needs no IPC_LOCK
    only_efa, _ = render_spec(spec, gpu, 8, kinds=("raycluster",), efa=2)
    (container,) = only_efa["raycluster"]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == "2" and "securityContext" not in container
    assert "NCCL_NET" not in {e["name"] for e in container["env"]}


def test_bad_network_device_options_are_refused(monkeypatch):
    from vray.k8s import render_spec

    monkeypatch.chdir(REPO)
    for bad in ("rdma_shared_device_a=1", "rdma/hca=0", "rdma/hca"):
        with pytest.raises(VrayError, match="--rdma .*RESOURCE=COUNT"):
            render_spec("jobs/qwen3-vl-32b-full.yaml", "A100-40GB", 8, rdma=(bad,))
    with pytest.raises(VrayError, match="--efa .*GPU worker pods"):
        render_spec("jobs/tiny-cpu.yaml", None, efa=1)


def test_token_auth_set_overrides_replica_resources_and_pods_that_need_shared_storage(rendered, monkeypatch):
    import shlex

    from vray.k8s import render_spec
    from vray.serve.options import ReplicaSize

    for r in rendered:
        for kind, m in r.manifests.items():
            cluster = m["spec"].get("rayClusterSpec") or m["spec"].get("rayClusterConfig") or m["spec"]
            assert cluster["authOptions"] == {"mode": "token"}, (r.folder, kind)  # the operator makes the token
    # The replicas' sized accelerator type (which Ray never adds to a node by itself) is declared by their group.
    service = next(r for r in rendered if "rayservice" in r.manifests).manifests["rayservice"]["spec"]
    asked = yaml.safe_load(service["serveConfigV2"])["applications"][0]["deployments"][0]["ray_actor_options"]
    (group,) = service["rayClusterConfig"]["workerGroupSpecs"]
    assert group["resources"] == {f"accelerator_type:{asked['accelerator_type']}": "1"}
    assert ReplicaSize(1, 0, None).ray_actor_options() == {"num_cpus": 1}  # a CPU replica asks for nothing else

    # `--set` overrides are what the RayJob trains with, quoted for the shell.
    monkeypatch.chdir(REPO)
    sets = ["hyperparameters.epochs=3", "systemPrompt=Answer in one word.", "name=ignored"]
    manifests, command = render_spec("jobs/qwen3.5-4b-lora.yaml", "L4-24GB", 1, kinds=("rayjob",), overrides=sets)
    words = shlex.split(manifests["rayjob"]["spec"]["entrypoint"])
    assert words[:2] == ["vray", "train"] and "hyperparameters.epochs=3" in words
    assert "systemPrompt=Answer in one word." in words and words[-2:] == ["--set", "name=ignored"]
    assert "--set hyperparameters.epochs=3" in command

    # A CPU plan runs one pod per worker: a node-local run directory would be split over the pods.
    many = ["cluster.workers=2", "output=/home/ray/runs"]
    with pytest.raises(VrayError, match="2 pods.*s3://BUCKET/runs.*shared volume"):
        render_spec("jobs/tiny-cpu.yaml", None, overrides=many)
    assert render_spec("jobs/tiny-cpu.yaml", None, overrides=["cluster.workers=2", "output=s3://b/runs"])[0]
    assert render_spec("jobs/tiny-cpu.yaml", None, overrides=["output=/home/ray/runs"])[0]  # one pod: its own disk
