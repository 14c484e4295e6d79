"""Placement on simulated multi-node Ray clusters (nodes declare fake GPUs; CUDA is never touched): a fixed one, and
an autoscaling one whose GPU nodes exist only once its autoscaler adds them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from tests.conftest import agent_ports, stop_cluster
from vray.cluster import _refresh_ray_auth, check_cluster_capacity, connect, free_port, inventory_from_cluster
from vray.errors import VrayError
from vray.plan.gpus import Inventory, gpu
from vray.plan.planner import plan_run
from vray.spec import validate_spec

pytestmark = pytest.mark.slow


@contextmanager
def _loopback_cluster_env(auth_mode: str | None = None):
    """A test cluster of this process's own: not RAY_ADDRESS's, no driver still connected. Its head finds the session's
    token (conftest's `ray_token`); `auth_mode` is exported for heads that are not started by `ray start`, which is
    what turns authentication on by itself when a token exists."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        if ray.is_initialized():
            ray.shutdown()
        if auth_mode:
            mp.setenv("RAY_AUTH_MODE", auth_mode)
            _refresh_ray_auth()
        try:
            yield
        finally:
            mp.undo()
            _refresh_ray_auth()


# ---- an autoscaling cluster ------------------------------------------------------------------------------------
# What ray.cluster_utils.AutoscalingCluster starts: a head whose autoscaler (v2, as the rendered RayClusters use)
# launches FakeMultiNodeProvider nodes (local raylets declaring fake GPUs). AutoscalingCluster itself cannot run from
# Ray 2.60's wheel: it reads fake_multi_node/example.yaml, which the wheel does not ship, and its start() and
# shutdown() run `ray stop --force`, which stops every Ray cluster on the machine. The provider is therefore named as
# an external one (whose defaults need no file) and the cluster is stopped by its own session folder and port.
FAKE_HEAD = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # FakeMultiNodeProvider's head node id
GPU_NODE = {"resources": {"CPU": 16, "GPU": 8, "accelerator_type:A100-80G": 1}, "node_config": {},
            "min_workers": 0, "max_workers": 1}


def _autoscaling_config(gcs_address: str) -> dict:
    provider = {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "launch_multiple": True, "head_node_id": FAKE_HEAD, "gcs_address": gcs_address}
    return {"cluster_name": "vray-autoscaling-test", "max_workers": 4, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
            "provider": provider, "auth": {"ssh_user": "ray"}, "head_node_type": "ray.head.default",
            "available_node_types": {"ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
                                     "gpu-a100-80gb": GPU_NODE},
            # what the cluster launcher's defaults would fill in (the external provider has none)
            **{key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


@pytest.fixture
def autoscaling_cluster(tmp_path_factory):
    """A head without GPUs and an autoscaler that may add one node of 8 fake A100-80GB (min_workers 0)."""
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = free_port()
    temp_dir = tmp_path_factory.mktemp("ray-as")
    config = temp_dir / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(f"127.0.0.1:{port}")))
    with _loopback_cluster_env():
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD}
        subprocess.run([ray_exe, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                        f"--autoscaling-config={config}", f"--ray-client-server-port={free_port()}", *agent_ports()],
                       check=True, capture_output=True, text=True, env=env, timeout=120)
        try:
            connect(f"127.0.0.1:{port}", log_to_driver=False)
            _wait_for_the_autoscaler()
            yield
        finally:
            ray.shutdown()
            stop_cluster(temp_dir)  # and the head's Ray client server


def _wait_for_the_autoscaler(timeout_s: float = 90) -> None:
    """Until the autoscaler has reported its first state to the GCS (a running cluster's has long done so)."""
    import time

    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    gcs = GcsClient(ray.get_runtime_context().gcs_address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
        if reply.autoscaling_state.autoscaler_state_version > 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the autoscaler reported no state in {timeout_s} s")


def _plan(workers: int):
    spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "7B"}, "hyperparameters": {"batchSize": workers},
                          "cluster": {"workers": workers}})
    return plan_run(spec, Inventory(gpu("A100-80GB"), 8, None))


@pytest.mark.timeout(300)
def test_an_autoscaling_cluster_is_planned_for_what_its_autoscaler_can_add(autoscaling_cluster):
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    one_node, two_nodes = _plan(8), _plan(16)
    assert (one_node.nodes, two_nodes.nodes) == (1, 2)
    assert sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]) == 0  # no GPU alive: minReplicas 0

    # An autoscaler that reports its node groups to the GCS: planned from them, without asking it anything.
    gcs = GcsClient(ray.get_runtime_context().gcs_address)
    group = NodeGroupConfig(name="gpu-a100-80gb", min_count=0, max_count=1)
    group.resources.update({"CPU": 16, "GPU": 8, "accelerator_type:A100-80G": 1, "memory": 8 * 64 * 2**30})
    gcs.report_cluster_config(ClusterConfig(node_group_configs=[group]).SerializeToString())
    inventory = inventory_from_cluster(None)  # `vray plan --from-cluster`, `vray train` without cluster.gpu
    assert (inventory.gpu.name, inventory.gpus_per_node, inventory.nodes) == ("A100-80GB", 8, 1)
    capacity = check_cluster_capacity(one_node)
    assert (capacity.source, capacity.alive_gpus, capacity.added_gpus) == ("autoscaler", 0, 8)
    assert capacity.describe().startswith("planned for 8 GPU(s) the autoscaler can add")
    with pytest.raises(VrayError, match=r"needs 16 GPU\(s\) on 2 node.*autoscaler can add 8 .*maxReplicas"):
        check_cluster_capacity(two_nodes)
    gcs.report_cluster_config(ClusterConfig().SerializeToString())  # withdrawn: the autoscaler is asked instead

    # Ray 2.60's autoscaler reports no node groups: it judges the plan's placement group.
    with pytest.raises(VrayError, match="autoscaler reports the plan's placement group as infeasible"):
        check_cluster_capacity(two_nodes, answer_s=60)
    assert all(v["state"] == "REMOVED" for v in placement_group_table().values())
    capacity = check_cluster_capacity(one_node, answer_s=60)
    assert (capacity.source, capacity.added_gpus, capacity.placement) == ("autoscaler", 8, None)
    assert "it accepted the plan's placement group" in capacity.describe()
    # a cluster.nodes the autoscaler cannot reach is refused all the same
    with pytest.raises(VrayError, match="infeasible"):
        check_cluster_capacity(two_nodes, nodes=2, answer_s=60)


# ---- a fixed cluster --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_gpu_nodes():
    with _loopback_cluster_env(auth_mode="token"):
        node = {"num_cpus": 16, "num_gpus": 8, "resources": {"accelerator_type:A100-80G": 1}}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        connect(cluster.address, log_to_driver=False)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.mark.timeout(300)
def test_plan_bundles_land_on_the_planned_nodes(two_gpu_nodes):
    inventory = inventory_from_cluster(two_gpu_nodes.address)
    assert (inventory.gpu.name, inventory.gpus_per_node, inventory.nodes) == ("A100-80GB", 8, 2)
    spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "7B"}, "hyperparameters": {"batchSize": 16},
                          "cluster": {"workers": 16}})
    plan = plan_run(spec, inventory)
    assert (plan.num_workers, plan.nodes, plan.gpus_per_node) == (16, 2, 8)
    capacity = check_cluster_capacity(plan)
    assert Counter(capacity.placement) == {0: 8, 1: 8}
    assert capacity.describe() == "planned for the 16 GPU(s) alive now"

    pg = placement_group(plan.bundles(), strategy=plan.scaling_config["placement_strategy"])
    ray.get(pg.ready(), timeout=120)
    bundle_nodes = placement_group_table(pg)["bundles_to_node_id"]
    per_node = Counter(bundle_nodes.values())
    assert sorted(per_node.values()) == [8, 8]  # eight workers on each node, as the plan says
    # Packing: consecutive ranks share a node.
    first = [bundle_nodes[i] for i in range(8)]
    assert len(set(first)) == 1
    remove_placement_group(pg)


@pytest.mark.timeout(300)
def test_a_plan_larger_than_the_cluster_is_refused_before_it_starts(two_gpu_nodes):
    spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "7B"}, "hyperparameters": {"batchSize": 24},
                          "cluster": {"workers": 24}})
    plan = plan_run(spec, Inventory(gpu("A100-80GB"), 8, None))
    assert plan.nodes == 3
    with pytest.raises(VrayError, match="needs 24 GPU\\(s\\) on 3 node"):
        check_cluster_capacity(plan)
    assert ray.util.placement_group_table() == {} or all(
        v["state"] == "REMOVED" for v in ray.util.placement_group_table().values())
    # No autoscaler tells its limits here: a cluster.nodes that covers the plan is trusted, and the output says so.
    capacity = check_cluster_capacity(plan, nodes=3)
    assert (capacity.source, capacity.alive_gpus, capacity.added_gpus) == ("nodes", 16, 8)
    assert capacity.describe().startswith("planned for --nodes (cluster.nodes): 16 GPU(s) alive now")


# ---- what the workers get ---------------------------------------------------------------------------------------


def test_nccl_and_allocator_settings_reach_the_workers_with_gpu_defaults(monkeypatch):
    from vray.cluster import forwarded_env

    for key in ("PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_AVOID_RECORD_STREAMS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("FI_PROVIDER", "efa")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # Ray sets it per worker: never forwarded
    cpu = forwarded_env()
    assert {k: cpu[k] for k in ("NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "FI_PROVIDER", "TORCH_NCCL_ASYNC_ERROR_HANDLING")} \
        == {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO", "FI_PROVIDER": "efa", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert "CUDA_VISIBLE_DEVICES" not in cpu and "PYTORCH_CUDA_ALLOC_CONF" not in cpu
    gpu_env = forwarded_env(gpu=True)
    assert gpu_env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert gpu_env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # the user's own setting wins
    monkeypatch.setenv("TORCH_NCCL_AVOID_RECORD_STREAMS", "0")
    gpu_env = forwarded_env(gpu=True)
    assert (gpu_env["PYTORCH_CUDA_ALLOC_CONF"], gpu_env["TORCH_NCCL_AVOID_RECORD_STREAMS"]) == ("max_split_size_mb:512", "0")


def test_the_collective_timeout_covers_checkpoints_and_reaches_torch_config(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vray.storage.rundir import RunDir
    from vray.train.launcher import COLLECTIVE_TIMEOUT_FLOOR_S, collective_timeout_s, trainer

    for key in ("PYTORCH_CUDA_ALLOC_CONF", "TORCH_NCCL_AVOID_RECORD_STREAMS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NCCL_IB_HCA", "mlx5")
    lora = validate_spec({"architecture": {"name": "qwen3vl", "size": "8B"}})
    full = validate_spec({"architecture": {"name": "qwen3vl", "size": "32B"}, "trainingMode": {"type": "Full"},
                          "hyperparameters": {"batchSize": 16}})
    lora_plan = plan_run(lora, Inventory(gpu("A100-80GB"), 1, None))
    full_plan = plan_run(full, Inventory(gpu("A100-40GB"), 8, None))
    assert lora_plan.fits and full_plan.fits and full_plan.nodes == 2
    assert collective_timeout_s(lora_plan, lora) == COLLECTIVE_TIMEOUT_FLOOR_S == 7200  # Ray Train's default: 1800
    big = collective_timeout_s(full_plan, full)
    m, offloaded = full_plan.per_gpu_bytes, full_plan.assumptions.get("cpu_bytes_per_rank") or 0
    share = m.weights + m.optimizer + offloaded  # ZeRO-3 offload: the states live in CPU memory
    assert share > 30 * 2**30 and big == int(4 * share * 8 / (100 * 2**20)) > 3 * 3600

    prepared = SimpleNamespace(plan=full_plan, spec=full, run=RunDir.of(str(tmp_path / "run")))
    built = trainer(prepared, config=None)
    assert built.backend_config.timeout_s == big
    env = built.run_config.worker_runtime_env["env_vars"]
    assert env["NCCL_IB_HCA"] == "mlx5" and env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
