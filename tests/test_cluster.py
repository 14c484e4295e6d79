"""Placement on a simulated multi-node Ray cluster (nodes declare fake GPUs; CUDA is never touched)."""

from __future__ import annotations

from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from vray.cluster import check_cluster_capacity, inventory_from_cluster
from vray.errors import VrayError
from vray.plan.planner import plan_run
from vray.spec import validate_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_gpu_nodes():
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        if ray.is_initialized():
            ray.shutdown()
        node = {"num_cpus": 16, "num_gpus": 8, "resources": {"accelerator_type:A100-80G": 1}}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
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
    planned = check_cluster_capacity(plan)
    assert Counter(planned) == {0: 8, 1: 8}

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
    from vray.plan.gpus import Inventory, gpu

    plan = plan_run(spec, Inventory(gpu("A100-80GB"), 8, None))
    assert plan.nodes == 3
    with pytest.raises(VrayError, match="needs 24 GPU\\(s\\) on 3 node"):
        check_cluster_capacity(plan)
    assert ray.util.placement_group_table() == {} or all(
        v["state"] == "REMOVED" for v in ray.util.placement_group_table().values())
