"""benchmarks/gpu_check.py in its CPU smoke mode, in a process where Ray cannot be imported (as on a GPU machine
lent for checks): vray's per-worker code runs without Ray, and the result says per part what ran and why not. Its
stages are the throughput and memory benchmarks (benchmarks/train_throughput.py, benchmarks/memory_vs_plan.py):
their plan, FLOP count and prediction are for the very sample they train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_RAY = '''
import importlib.abc
import sys


class _NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name + " is blocked here")
        return None


sys.meta_path.insert(0, _NoRay())
'''
RUN = ["throughput:qwen3vl:8B", "memory:qwen3.5:9B", "memory:sharded", "qlora_dequantize", "fsdp2_lora_experts"]


@pytest.mark.timeout(600)
def test_cpu_smoke_runs_without_ray_and_reports_every_part(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_RAY)  # every process of the check, its parts included
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out",
                           str(tmp_path / "out"), "--wheels", str(tmp_path / "no-wheels"), "--parts", *RUN],
                          env=env, capture_output=True, text=True, timeout=580)
    files = sorted((tmp_path / "out").glob("gpu_check-*.json"))
    assert files, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(files[-1].read_text())
    assert done.returncode == 0, json.dumps(result["parts"], indent=1)[-4000:]
    assert result["cpu_smoke"] is True and result["ray_importable"] is False
    assert {"device", "torch", "transformers", "date", "install", "settings", "seconds"} <= set(result)
    parts = result["parts"]
    assert set(parts) == {"throughput:qwen3vl:8B", "memory:qwen3.5:9B", "memory:sharded", "qlora_dequantize",
                          "fsdp2_fused_adamw", "fsdp2_lora_experts"}
    for name, part in parts.items():
        if name in RUN and name != "memory:sharded":
            assert part["status"] == "ok", part
        else:
            assert part["status"] == "skipped" and part["why"], part
    assert "two or more" in parts["memory:sharded"]["why"]  # one machine without GPUs: said, not failed

    throughput = parts["throughput:qwen3vl:8B"]
    sample = throughput["sample"]
    assert sample["sequence"] == 96 and sample["visual_tokens"] > 0 and 0 < sample["scored_tokens"] < 96
    flops = throughput["flops_per_sample"]
    assert flops["model"] > 0 and flops["recompute"] == 0 and flops["hardware"] == flops["model"]
    vray, hf = throughput["vray"], throughput["hf"]
    assert len(vray["losses"]) == len(hf["losses"]) == 2  # the warm-up step and one timed step
    assert vray["losses"][0] == pytest.approx(hf["losses"][0], abs=2e-2)  # the same model, data and objective
    assert vray["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and throughput["vray_over_hf_tokens_per_s"] > 0

    memory = parts["memory:qwen3.5:9B"]
    assert memory["planned_for"] == "L4-24GB" and memory["sample"]["visual_tokens"] > 0
    assert memory["predicted_step_bytes"]["total"] > 0 and len(memory["measured"]["losses"]) == 2
    assert memory["comparison"]["measured"] is None and "no CUDA" in memory["comparison"]["why"]
    qlora = parts["qlora_dequantize"]
    assert qlora["dequantised_identical"] is True and qlora["max_abs_difference"] == 0.0
    experts = parts["fsdp2_lora_experts"]
    assert experts["expert_adapter_tensors"] > 0 and experts["expert_adapters_changed"] > 0
    assert experts["dtensor_parameters"] == experts["trainable_tensors"]


def test_without_cuda_it_says_so_and_exits_cleanly(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--wheels", str(tmp_path / "no-wheels")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device" in done.stdout
    result = json.loads(next(tmp_path.glob("gpu_check-*.json")).read_text())
    assert result["cpu_smoke"] is False and result["parts"]
    assert all(p["status"] == "skipped" and p["why"].startswith("no GPU") for p in result["parts"].values())
