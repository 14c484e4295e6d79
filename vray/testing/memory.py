"""Measuring a process's anonymous memory: the high-water mark of RssAnon (from /proc), sampled while a worker loads
and trains, for the sharded-loading test and benchmark. File-backed pages (a memory-mapped checkpoint) are not
anonymous memory and do not count."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

INTERVAL_S = 0.005


def rss_anon() -> int:
    """This process's resident anonymous memory, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line (Linux only)")


class AnonSampler:
    """Samples RssAnon on a thread until stopped; `peak` is the highest sample (and the value at start and stop)."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval_s)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write(folder: str, name: str, record: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}-rank{_rank()}.json").write_text(json.dumps(record))


def overhead_probe(folder: str) -> None:
    """A rank's fixed overhead without a model: the training code and its libraries imported, DeepSpeed's
    communication set up on the process group, one collective run; its RssAnon high-water goes to `folder`."""
    with AnonSampler() as sampler:
        import deepspeed
        import torch
        import torch.distributed as dist
        import transformers  # noqa: F401

        import vray.train.loop  # noqa: F401

        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
        t = torch.ones(1)
        dist.all_reduce(t)
        gc.collect()
    _write(folder, "overhead", {"peak_bytes": sampler.peak})


def measured_train_worker(config: Any) -> None:
    """Set up and train as a worker does (vray.train.loop), sampling RssAnon: the high-water while the model is
    built, loaded and wrapped (`load_peak_bytes`), while it trains up to its first checkpoint (`step_peak_bytes`)
    and with the checkpoints written (`final_peak_bytes`), go to
    `<run dir>/memory/train-rank<r>.json` with the value just before loading."""
    from vray.train.loop import LocalReporter, Recipe

    gc.collect()
    before = rss_anon()
    recipe = Recipe(config, LocalReporter())
    with AnonSampler() as load:
        recipe.setup()
    gc.collect()
    stepped: dict[str, int] = {}

    def stop_before(save: Any) -> Any:  # the step's high-water ends where the first checkpoint starts
        def wrapped(*args: Any) -> Any:
            stepped.setdefault("peak", step.peak)
            return save(*args)
        return wrapped

    recipe.save_checkpoint = stop_before(recipe.save_checkpoint)  # type: ignore[method-assign]
    recipe.save_final = stop_before(recipe.save_final)  # type: ignore[method-assign]
    with AnonSampler() as step:
        recipe.train()
    _write(f"{config.run_dir}/memory", "train", {"before_bytes": before, "load_peak_bytes": load.peak,
                                                 "step_peak_bytes": stepped.get("peak", step.peak),
                                                 "final_peak_bytes": step.peak})


def measure(item: Any) -> None:
    """A process-group entry (vray.train.local.run_workers): a folder name runs the overhead probe, a worker config
    is trained under measurement."""
    if isinstance(item, str):
        overhead_probe(item)
    else:
        measured_train_worker(item)


def read_measurements(run_dir: str, probe_folder: str, world: int) -> list[dict[str, int]]:
    """Per rank: the fixed overhead and the load and step high-water marks, in bytes."""
    out = []
    for rank in range(world):
        probe = json.loads((Path(probe_folder) / f"overhead-rank{rank}.json").read_text())
        train = json.loads((Path(run_dir) / "memory" / f"train-rank{rank}.json").read_text())
        out.append({"overhead_bytes": probe["peak_bytes"], **train})
    return out


def sharded_load_spec(strategy: str, checkpoint: Path, out: str, workers: int = 2) -> dict[str, Any]:
    """The measured run: LoRA at BFloat16 on a Qwen2.5-VL-3B-shaped checkpoint, one optimizer step of one micro-batch
    per rank (a 56x56 image and a short question), no evaluation."""
    from vray.data.synthetic import split_paths

    train, _ = split_paths(f"synthetic:vqa?train={workers}&eval=1&size=56")
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": str(checkpoint)},
            "trainingMode": {"type": "LoRA"}, "compute": {"precisionType": "BFloat16"}, "task": "vqa",
            "data": {"train": str(train)}, "media": {"maxPixels": 56 * 56},
            "hyperparameters": {"epochs": 1, "batchSize": workers, "learningRate": 1e-4},
            "lora": {"dropout": 0.05}, "cluster": {"workers": workers, "strategy": strategy},
            "output": out, "name": f"sharded-{strategy}"}


def measure_engines(checkpoint: Path, strategies: tuple[str, ...], out: str, workers: int = 2) -> dict[str, Any]:
    """Each engine in a process group of its own (no run inherits another's memory): the overhead probe, then the
    measured run. Per strategy: the prepared run (its plan) and each rank's measurements."""
    from vray.spec import validate_spec
    from vray.train.local import run_workers
    from vray.train.prepare import prepare, worker_config, write_run_files

    results: dict[str, Any] = {}
    for strategy in strategies:
        prepared = prepare(validate_spec(sharded_load_spec(strategy, checkpoint, out, workers)))
        write_run_files(prepared)
        config = worker_config(prepared, rows_in=f"{out}/rows/{strategy}")
        probe = f"{out}/probe-{strategy}"
        started = time.time()
        run_workers([probe, config], workers, entry=measure)
        results[strategy] = {"prepared": prepared, "ranks": read_measurements(config.run_dir, probe, workers),
                             "seconds": round(time.time() - started, 1),
                             "plan": plan_for_the_batch(prepared.spec, config)}
    return results


def plan_for_the_batch(spec: Any, config: Any) -> Any:
    """The CPU plan sized for the sample the run trains on (its longest encoded row), not the default sample: the
    prediction to compare a measurement with."""
    from vray.plan.memory import sample_shape
    from vray.plan.planner import cpu_plan, cpu_profile
    from vray.train.loop import CollatorFactory

    collator = CollatorFactory.of(spec)()
    encoded = [collator.encode(s) for s in config.train.read(range(len(config.train))).values()]
    longest = max(encoded, key=lambda e: e.length)
    profile = cpu_profile(spec)
    visual = sample_shape(profile, spec.media.minPixels, spec.media.maxPixels, text_tokens=0)
    sample = sample_shape(profile, spec.media.minPixels, spec.media.maxPixels,
                          text_tokens=max(1, longest.length - visual.visual_tokens))
    return cpu_plan(spec, sample=sample, profile=profile)
