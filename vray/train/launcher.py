"""The driver side of `vray train`: check everything, write the run directory, run a Ray TorchTrainer.

Order: validate spec and data (before any work) -> plan -> run directory (spec.yaml, plan.json) -> Ray
(joins RAY_ADDRESS or a running local cluster, else starts one) -> TorchTrainer.fit() with a progress
display read from metrics.jsonl -> curves.png. The run directory path is the last line printed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from vray.errors import DataError, PlanError, VrayError
from vray.plan.plan import Plan, cpu_plan
from vray.ray_session import ensure_ray, forwarded_env
from vray.spec import RunSpec, require_for_training
from vray.train.loop import WorkerConfig, train_worker
from vray.rundir import RunDir, require_shared_storage


@dataclass(frozen=True)
class PreparedRun:
    """A resolved spec, its plan and where its data and outputs live."""

    spec: RunSpec
    plan: Plan
    run: RunDir
    train_path: str
    eval_path: str | None
    data: DataCheck | None = None


def data_paths(spec: RunSpec) -> tuple[str, str | None]:
    """(train, eval) dataset paths or URIs; `synthetic:` datasets are written on first use."""
    from vray.testing import synthetic

    train = spec.data.train or ""
    eval_path = spec.data.eval
    if train.startswith("synthetic:"):
        tr, ev = synthetic.split_paths(train)
        if eval_path and eval_path.startswith("synthetic:"):
            eval_path = str(synthetic.split_paths(eval_path)[1])
        return str(tr), eval_path or str(ev)
    if eval_path and eval_path.startswith("synthetic:"):
        eval_path = str(synthetic.split_paths(eval_path)[1])
    local = lambda p: p if (p is None or "://" in p) else str(Path(p).expanduser().resolve())  # noqa: E731
    return local(train), local(eval_path)


def token_budget(spec: RunSpec) -> int:
    """The most tokens one sample may take: data.maxTokens, else the model's context length."""
    if spec.data.maxTokens:
        return spec.data.maxTokens
    cfg = spec.arch.config
    text = cfg.get("text_config") or cfg.get("llm_cfg") or cfg
    return int(text.get("max_position_embeddings") or 32768)


@dataclass(frozen=True)
class DataCheck:
    """What the driver's check of the data decided."""

    reports: tuple[Any, ...]
    exclude_ids: tuple[str, ...]
    skipped_rows: int


def check_data(spec: RunSpec, train: str, eval_path: str | None, skip_invalid: bool, console: Console | None) -> DataCheck:
    """Check every row of the training and held-out data before anything starts; refuse errors unless told to
    skip them, and then count and report every skipped row."""
    from vray.data.check import check_dataset
    from vray.models.loader import load_processor, resolve_processor_source

    try:
        processor = load_processor(resolve_processor_source(spec.model.source or spec.arch.repo_id, spec.model.revision),
                                   spec.media)
    except VrayError:
        processor = None  # the hub is out of reach: token counts are estimated
    budget = token_budget(spec)
    reports = []
    for uri in (train, eval_path):
        if not uri:
            continue
        reports.append(check_dataset(uri, spec.arch, processor, task=spec.effective_task, max_tokens=budget,
                                     max_frames=spec.media.maxFrames, system_prompt=spec.systemPrompt))
    errors = [i for r in reports for i in r.errors]
    skipped = sum(r.invalid_rows for r in reports)
    if errors and not skip_invalid:
        shown = "\n".join(f"  - {i.where}: {i.message}" for i in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(
            f"{skipped} row(s) with errors ({len(errors)} problem(s)); nothing was trained. Fix them, or pass "
            f"--skip-invalid to train without them (`vray data check` lists them all):\n{shown}{more}"
        )
    if errors and console is not None:
        console.print(f"[yellow]skipping {skipped} invalid row(s) (--skip-invalid); each is listed in data_check.json[/yellow]")
    for r in reports:
        if r.rows - r.invalid_rows == 0:
            raise DataError(f"data: no valid sample in {r.source}")
    return DataCheck(tuple(reports), tuple(sorted({i for r in reports for i in r.invalid_ids})), skipped)


def gpu_inventory(spec: RunSpec) -> Any:
    """The GPUs a run may use: the spec's cluster block, else the Ray cluster it will join, else this machine."""
    import os

    from vray.plan.gpus import gpu, local_gpu
    from vray.plan.planner import DEFAULT_GPUS_PER_NODE, Inventory, cluster_gpu_inventory

    if spec.cluster.gpu:
        return Inventory(gpu(spec.cluster.gpu), spec.cluster.gpusPerNode or DEFAULT_GPUS_PER_NODE, spec.cluster.nodes)
    if os.environ.get("RAY_ADDRESS"):  # a cluster (ray job submit sets it): plan for its GPUs
        return cluster_gpu_inventory(os.environ["RAY_ADDRESS"])
    local = local_gpu()
    if local is not None:
        return Inventory(local[0], local[1], 1)
    return None


def plan_for(spec: RunSpec) -> Plan:
    """The plan for the GPUs the run may use, or CPU workers when there are none. A PlanError when it does not fit."""
    from vray.plan.planner import plan_run
    from vray.train.engines import ENGINES

    inventory = gpu_inventory(spec)
    if inventory is None:
        return cpu_plan(spec)
    plan = plan_run(spec, inventory)
    if not plan.fits:
        lines = "\n".join(f"  - {s}" for s in plan.suggestions)
        raise PlanError(f"{plan.reason}" + (f"\nwhat would fit:\n{lines}" if lines else "") + "\n(`vray plan` shows the breakdown)")
    if plan.strategy not in ENGINES:
        raise VrayError(
            f"the plan needs the {plan.strategy} strategy, which has no engine in this version (engines: "
            f"{', '.join(ENGINES)}); `vray plan` shows the plan"
        )
    return plan


def prepare(spec: RunSpec, resume: bool = False, skip_invalid: bool = False, console: Console | None = None) -> PreparedRun:
    """Everything checked and decided before any work starts: spec, data (every row), plan, run directory."""
    require_for_training(spec)
    spec = spec.resolved()
    run = RunDir.of(spec.run_dir)
    if run.exists("spec.yaml") and not resume:
        raise VrayError(f"run directory {run.uri} already exists; set another name, or resume it with --resume {run.uri}")
    train, eval_path = data_paths(spec)
    data = check_data(spec, train, eval_path, skip_invalid, console)
    plan = plan_for(spec)
    if plan.device == "gpu":  # a CPU plan's "nodes" are fsdp2-hybrid replica groups, packed wherever Ray puts them
        require_shared_storage(run.uri, plan.nodes)
    return PreparedRun(spec, plan, run, train, eval_path, data)


def worker_config(prepared: PreparedRun, resume_from: Path | None = None) -> WorkerConfig:
    """What every worker of the run receives."""
    return WorkerConfig(
        spec=prepared.spec.to_dict(), plan=prepared.plan.to_dict(), run_dir=prepared.run.uri,
        train_path=prepared.train_path, eval_path=prepared.eval_path,
        resume_from=str(resume_from) if resume_from else None,
        exclude_ids=prepared.data.exclude_ids if prepared.data else (),
        skip_invalid=bool(prepared.data and prepared.data.skipped_rows),
        max_tokens=token_budget(prepared.spec),
    )


def write_run_files(prepared: PreparedRun) -> None:
    """spec.yaml (resolved), plan.json and data_check.json (what the data check found and skipped)."""
    import json

    run = prepared.run
    if run.local:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    run.write_text("spec.yaml", prepared.spec.to_yaml())
    run.write_text("plan.json", prepared.plan.to_json() + "\n")
    if prepared.data is not None:
        reports = [json.loads(r.to_json()) for r in prepared.data.reports]
        run.write_text("data_check.json", json.dumps({"skipped_rows": prepared.data.skipped_rows,
                                                      "excluded_ids": list(prepared.data.exclude_ids),
                                                      "datasets": reports}, indent=2) + "\n")


def ray_datasets(prepared: PreparedRun) -> dict[str, Any]:
    """The validated samples as Ray Datasets (one JSON row each); every worker reads its rows from them."""
    import json

    import ray.data

    from vray.data.io import read_samples, sample_row

    excluded = set(prepared.data.exclude_ids) if prepared.data else set()
    out = {}
    for split, uri in (("train", prepared.train_path), ("eval", prepared.eval_path)):
        if not uri:
            continue
        samples = [s for s in read_samples(uri, task=prepared.spec.effective_task).samples if s.id not in excluded]
        out[split] = ray.data.from_items([{"sample_json": json.dumps(sample_row(s))} for s in samples])
    return out


def ray_storage_filesystem(run: RunDir) -> Any:
    """The pyarrow filesystem Ray Train writes a remote run directory through: fsspec's (s3fs), so Ray and vray
    use the same endpoint and credentials; None for a local run."""
    if run.local:
        return None
    import os

    import fsspec
    import pyarrow.fs

    options: dict[str, Any] = {}
    if run.uri.startswith("s3://"):
        # Explicit settings travel with the filesystem to Ray's controller and workers (their environment may lack them).
        env = os.environ
        if env.get("AWS_ACCESS_KEY_ID"):
            options.update(key=env["AWS_ACCESS_KEY_ID"], secret=env.get("AWS_SECRET_ACCESS_KEY"),
                           token=env.get("AWS_SESSION_TOKEN"))
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    fs = fsspec.filesystem(run.uri.split("://", 1)[0], **options)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_storage_path(run: RunDir) -> str:
    """Ray Train's storage_path: the run directory's parent (without the scheme when Ray gets a filesystem)."""
    parent = run.uri.rsplit("/", 1)[0]
    return parent if run.local else parent.split("://", 1)[1]


class _RayReporter:
    """Reports to Ray Train; checkpoints are already in the run directory (Ray records, does not copy)."""

    def __init__(self, resume_from: str | None, run_dir: str):
        self.resume_from = resume_from
        self.run_dir = run_dir

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        rank = ray.train.get_context().get_world_rank()
        ckpt = None
        if checkpoint is not None and rank == 0:
            run = RunDir.of(self.run_dir)
            fs = ray_storage_filesystem(run)
            ckpt = Checkpoint(path=str(checkpoint).split("://", 1)[-1], filesystem=fs) if fs else Checkpoint(path=str(checkpoint))
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def restore_from(self) -> Any:
        """The newest complete checkpoint of the run (after a restart), else the one to resume from. The run
        directory decides, not Ray's record: a checkpoint whose report Ray had not registered when a worker died
        is complete all the same (its marker is written last)."""
        import ray.train

        latest = RunDir.of(self.run_dir).latest_checkpoint()
        if latest is not None:
            return latest
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            return ckpt.path
        return self.resume_from


def _ray_train_func(config: dict[str, Any]) -> None:
    train_worker(config, _RayReporter(config.get("resume_from"), config["run_dir"]))


class ProgressView:
    """Renders step, loss, samples/s and ETA from metrics.jsonl while training runs."""

    def __init__(self, run: RunDir, console: Console):
        self.run, self.console = run, console
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProgressView:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        seen = 0
        with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=None, info="starting workers...")
            while True:
                stopping = self._stop.is_set()
                records = self.run.read_metrics()
                for rec in records[seen:]:
                    if rec.get("event") == "start":
                        progress.update(task, total=rec["total_steps"], completed=rec.get("resumed_at", 0))
                    elif "loss" in rec:
                        eta = rec.get("eta_s", 0.0)
                        progress.update(task, completed=rec["step"], info=(
                            f"loss {rec['loss']:.4f}  {rec['samples_per_s']:.1f} samples/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}"))
                    evals = {k: v for k, v in rec.items() if k.startswith("eval/") and k != "eval/samples"}
                    if evals:
                        shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in evals.items())
                        progress.console.print(f"  eval @ step {rec['step']}: {shown}")
                seen = len(records)
                if stopping:
                    return
                time.sleep(0.5)


def draw_curves(run: RunDir) -> Path | None:
    """curves.png: training loss and evaluation metrics against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run.read_metrics()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(*zip(*train), label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval loss")
        for key in sorted({k for r in evals for k in r if k.startswith("eval/") and k not in ("eval/loss", "eval/samples")}):
            axes[1].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-", label=key[5:])
    axes[0].set_xlabel("step"), axes[0].set_title("loss"), axes[0].legend()
    axes[1].set_xlabel("step"), axes[1].set_title("held-out metric"), axes[1].set_ylim(0, 1.05)
    if evals:
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no held-out data", ha="center", va="center", transform=axes[1].transAxes)
    fig.tight_layout()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "curves.png", dpi=100)
        plt.close(fig)
        run.upload(Path(tmp) / "curves.png", "curves.png")
    return run.join("curves.png")


def _vray_error_in(exc: BaseException) -> VrayError | None:
    """The VrayError a worker raised, found inside Ray's wrapping exceptions."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, VrayError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for sub in getattr(e, "worker_failures", {}).values() if isinstance(getattr(e, "worker_failures", None), dict) else []:
            stack.append(sub)
        stack += [x for x in getattr(e, "args", ()) if isinstance(x, BaseException)]
    return None


def run_training(prepared: PreparedRun, console: Console, resume_from: Path | None = None, verbose: bool = False,
                 max_failures: int = 0) -> RunDir:
    """Run the prepared training on Ray Train and finish the run directory."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(verbose)
    if prepared.plan.device == "gpu":
        from vray.plan.planner import check_cluster_capacity

        check_cluster_capacity(prepared.plan)  # refuse what the cluster cannot place, before anything starts
    write_run_files(prepared)
    config = worker_config(prepared, resume_from)
    sc = prepared.plan.scaling_config
    from ray.train import DataConfig

    trainer = TorchTrainer(
        _ray_train_func,
        train_loop_config=config.to_dict(),
        datasets=ray_datasets(prepared),
        # Every worker sees all rows and takes its share in the run's seeded order (deterministic, resumable).
        dataset_config=DataConfig(datasets_to_split=[]),
        scaling_config=ScalingConfig(num_workers=sc["num_workers"], use_gpu=sc["use_gpu"],
                                     resources_per_worker=sc["resources_per_worker"],
                                     placement_strategy=sc["placement_strategy"]),
        run_config=RunConfig(name=prepared.run.name, storage_path=ray_storage_path(prepared.run),
                             storage_filesystem=ray_storage_filesystem(prepared.run),
                             worker_runtime_env={"env_vars": forwarded_env()},
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        with ProgressView(prepared.run, console):
            trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface a worker's VrayError as itself
        user_error = _vray_error_in(exc)
        if user_error is not None:
            raise user_error from None
        raise
    draw_curves(prepared.run)
    return prepared.run


def train_processes(prepared: PreparedRun, resume_from: Path | None = None) -> RunDir:
    """Run the plan's workers as local processes in a plain torch.distributed group (no Ray)."""
    from vray.train.local import run_workers

    write_run_files(prepared)
    run_workers(worker_config(prepared, resume_from).to_dict(), prepared.plan.num_workers,
                backend="nccl" if prepared.plan.device == "gpu" else "gloo")
    draw_curves(prepared.run)
    return prepared.run


def train_local(prepared: PreparedRun, resume_from: Path | None = None) -> RunDir:
    """Run the same worker code in this process, without Ray (a single worker)."""
    write_run_files(prepared)
    train_worker(worker_config(prepared, resume_from).to_dict())
    draw_curves(prepared.run)
    return prepared.run
