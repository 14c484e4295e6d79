"""Running a prepared run (`vray.train.prepare`): on Ray Train, as local processes, or in this process.

On Ray: join RAY_ADDRESS or a running local cluster, else start one -> refuse a plan the cluster cannot place ->
write the run files -> TorchTrainer.fit() with a progress display read from metrics.jsonl -> curves.png.
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from vray.cluster import ensure_ray, forwarded_env
from vray.errors import VrayError
from vray.fs import explicit_filesystem
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir
from vray.train.loop import WorkerConfig, train_worker
from vray.train.prepare import PreparedRun, worker_config, write_run_files
from vray.train.progress import ProgressView, draw_curves


def ray_storage_filesystem(run: RunDir) -> Any:
    """The pyarrow filesystem Ray Train writes a remote run directory through: fsspec's (s3fs), so Ray and vray
    use the same endpoint and credentials; None for a local run."""
    if run.local:
        return None
    import pyarrow.fs

    # Explicit settings travel with the filesystem to Ray's controller and workers (their environment may lack them).
    fs = explicit_filesystem(run.uri)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def ray_storage_path(run: RunDir) -> str:
    """Ray Train's storage_path: the run directory's parent (without the scheme when Ray gets a filesystem)."""
    parent = run.uri.rsplit("/", 1)[0]
    return parent if run.local else parent.split("://", 1)[1]


# Ray Train's record of a run's checkpoints, in the run directory (Ray's storage_path/name). vray reports no
# checkpoint to Ray: its retention deletes checkpoints, and a snapshot listing a deleted one stops every later
# fit() of the run (CheckpointManagerInitializationError), as `vray train --resume` after a killed driver.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


class _RayReporter:
    """Reports metrics to Ray Train. Checkpoints stay vray's: the run directory is what a restart restores from
    (a worker restarted by Ray, or `vray train --resume` after the driver died), so Ray is told of none."""

    def __init__(self, resume_from: str | None, run_dir: str):
        self.resume_from = resume_from
        self.run_dir = run_dir
        self.notice: dict[str, Any] | None = None  # the preemption notice the loop stopped at, if any

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean)

    def restore_from(self) -> Any:
        """The newest complete checkpoint of the run (after a restart), else the one to resume from. A checkpoint is
        complete when its marker is there (written last), whatever the process that wrote it became."""
        latest = RunDir.of(self.run_dir).latest_checkpoint()
        return latest if latest is not None else self.resume_from


    def preempted(self) -> dict[str, Any] | None:
        """Ray Train's preemption notice (`get_preemption_info`, a collective: every rank calls it once a step)."""
        import ray.train

        get = getattr(ray.train, "get_preemption_info", None)  # Train V2 only
        info = get() if get is not None else None
        if info is None:
            return None
        deadline = None
        if info.deadline_ms is not None:
            deadline = datetime.fromtimestamp(info.deadline_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
        self.notice = {"deadline": deadline, "deadline_ms": info.deadline_ms, "nodes": info.preempted_node_ids,
                       "ranks": info.preempted_ranks}
        return {k: v for k, v in self.notice.items() if k != "deadline_ms"}


# How long Ray Train waits for a preempted group without a deadline before it restarts it (its
# DEFAULT_PREEMPTION_DEADLINE_S), and how much longer a worker waits past that before it gives up.
RAY_PREEMPTION_DEFAULT_DEADLINE_S = 120
PREEMPTION_WAIT_MARGIN_S = 300


def _yield_to_restart(notice: dict[str, Any], grace_s: float) -> None:
    """After the preemption checkpoint: stay alive, idle, until Ray Train tears the group down (at the deadline
    plus the grace, or when the node goes) and restarts it. Returning would end the run: Ray Train takes a train
    function that returns as a finished run, preempted or not."""
    deadline_s = notice["deadline_ms"] / 1000 if notice.get("deadline_ms") else time.time() + RAY_PREEMPTION_DEFAULT_DEADLINE_S
    give_up = deadline_s + grace_s + PREEMPTION_WAIT_MARGIN_S
    while time.time() < give_up:
        time.sleep(1.0)
    raise VrayError(f"a preemption notice for node(s) {', '.join(notice['nodes'])} was checkpointed, but Ray Train did "
                    f"not restart the group within {PREEMPTION_WAIT_MARGIN_S} s of its deadline; resume the run "
                    "with `vray train --resume RUN_DIR`")


def _ray_train_func(loop_config: dict[str, WorkerConfig]) -> None:
    config = loop_config["config"]
    import ray

    # which node each rank is on: for operators (and the preemption test, the chaos benchmark)
    rank = ray.train.get_context().get_world_rank()
    RunDir.of(config.run_dir).write_text(f".workers/rank-{rank}.node", f"{ray.get_runtime_context().get_node_id()}\n")
    reporter = _RayReporter(config.resume_from, config.run_dir)
    train_worker(config, reporter)
    if reporter.notice is not None:
        _yield_to_restart(reporter.notice, config.spec.cluster.preemptionGraceS)


def _exception_in(exc: BaseException, wanted: Any) -> BaseException | None:
    """The first exception `wanted(e)` accepts, found inside Ray's wrapping exceptions (causes, contexts, worker
    failures and exception arguments)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if wanted(e):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        for sub in getattr(e, "worker_failures", {}).values() if isinstance(getattr(e, "worker_failures", None), dict) else []:
            stack.append(sub)
        stack += [x for x in getattr(e, "args", ()) if isinstance(x, BaseException)]
    return None


def _vray_error_in(exc: BaseException) -> VrayError | None:
    """The VrayError a worker raised, found inside Ray's wrapping exceptions."""
    found = _exception_in(exc, lambda e: isinstance(e, VrayError))
    return found if isinstance(found, VrayError) else None


# The collective timeout of the workers' process group. A collective waits for its slowest rank, and between two
# steps a rank may be busy for long: writing a checkpoint (every rank writes its shard, rank 0 the final weights too)
# or evaluating (generation on sharded engines gathers layers for every token). NCCL's watchdog kills the run when a
# collective outlasts it; Ray Train's default is 30 minutes.
COLLECTIVE_TIMEOUT_FLOOR_S = 2 * 3600
# A pessimistic write rate of one node to the run directory (all of its ranks together, to an object store).
NODE_WRITE_BYTES_PER_S = 100 * 2**20


def collective_timeout_s(plan: Any, spec: Any) -> int:
    """Seconds a collective may wait: at least 2 hours, and 4x the time one node takes to write its ranks' share of a
    checkpoint at NODE_WRITE_BYTES_PER_S (room for an evaluation and for storage slower than that). A rank's share is
    its optimizer states, in GPU memory or offloaded, plus its weights for full fine-tuning; a LoRA checkpoint holds
    only the adapters and their states."""
    m = plan.per_gpu_bytes
    if m is None:
        return COLLECTIVE_TIMEOUT_FLOOR_S
    offloaded = int(plan.assumptions.get("cpu_bytes_per_rank") or 0)
    per_rank = m.optimizer + offloaded + (m.weights if spec.trainingMode.type == "Full" else 0)
    per_node = per_rank * max(1, min(plan.gpus_per_node or 1, plan.num_workers))
    return max(COLLECTIVE_TIMEOUT_FLOOR_S, int(4 * per_node / NODE_WRITE_BYTES_PER_S))


def trainer(prepared: PreparedRun, config: WorkerConfig, max_failures: int = 0) -> Any:
    """The TorchTrainer of a prepared run (not started)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    sc = prepared.plan.scaling_config
    gpu = prepared.plan.device == "gpu"
    return TorchTrainer(
        _ray_train_func,
        # The typed config, pickled as it is; the checked samples are in the object store, each worker reads its own.
        train_loop_config={"config": config},
        torch_config=TorchConfig(timeout_s=collective_timeout_s(prepared.plan, prepared.spec)),
        scaling_config=ScalingConfig(num_workers=sc["num_workers"], use_gpu=sc["use_gpu"],
                                     resources_per_worker=sc["resources_per_worker"],
                                     placement_strategy=sc["placement_strategy"]),
        run_config=RunConfig(name=prepared.run.name, storage_path=ray_storage_path(prepared.run),
                             storage_filesystem=ray_storage_filesystem(prepared.run),
                             worker_runtime_env={"env_vars": forwarded_env(gpu=gpu)},
                             failure_config=FailureConfig(
                                 max_failures=max_failures,
                                 max_preemption_failures=prepared.spec.cluster.maxPreemptions,
                                 preemption_grace_s=prepared.spec.cluster.preemptionGraceS)),
    )


def forget_ray_checkpoints(run: RunDir) -> None:
    """Remove Ray Train's checkpoint snapshot from the run directory, if there is one."""
    if run.local:
        (run.root / RAY_SNAPSHOT).unlink(missing_ok=True)
    else:
        run.remove(RAY_SNAPSHOT)


def run_training(prepared: PreparedRun, console: Console, resume_from: Path | None = None, verbose: bool = False,
                 max_failures: int | None = None) -> RunDir:
    """Run the prepared training on Ray Train and finish the run directory; `max_failures` overrides
    cluster.maxFailures."""
    ensure_ray(verbose)
    if prepared.plan.device == "gpu":
        from vray.cluster import check_cluster_capacity

        # refuse what the cluster cannot place, before anything starts
        capacity = check_cluster_capacity(prepared.plan, nodes=prepared.spec.cluster.nodes)
        console.print(f"cluster: {capacity.describe()}")
    write_run_files(prepared)
    if resume_from is not None:
        # a run directory written before vray stopped reporting checkpoints to Ray may hold a snapshot that lists
        # checkpoints retention has deleted since; it holds nothing vray restores from
        forget_ray_checkpoints(prepared.run)
    if max_failures is None:
        max_failures = prepared.spec.cluster.maxFailures
    trainer_ = trainer(prepared, worker_config(prepared, resume_from), max_failures)
    try:
        with ProgressView(prepared.run, console):
            trainer_.fit()
    except Exception as exc:  # noqa: BLE001 - surface a worker's VrayError as itself
        user_error = _vray_error_in(exc)
        if user_error is not None:
            raise user_error from None
        preemption = _preemption_error_in(exc)
        if preemption is not None:
            raise VrayError(f"cluster.maxPreemptions ({prepared.spec.cluster.maxPreemptions}) is spent: {preemption}; "
                            f"{_resume_hint(prepared.run)} (or raise cluster.maxPreemptions)") from None
        raise
    if not prepared.run.exists(f"final/{CHECKPOINT_MARKER}"):  # the workers returned before the last step
        raise VrayError(f"the run ended before its last step (no final/ in {prepared.run.uri}); "
                        f"{_resume_hint(prepared.run)}")
    draw_curves(prepared.run)
    return prepared.run


def _resume_hint(run: RunDir) -> str:
    latest = run.latest_checkpoint()
    where = f"the latest complete checkpoint is {latest}" if latest is not None else "it has no complete checkpoint yet"
    return f"{where}; continue it with `vray train --resume {run.uri}`"


def _preemption_error_in(exc: BaseException) -> BaseException | None:
    """Ray Train's PreemptionError (the preemption budget is spent), found inside its wrapping, if it is one."""
    return _exception_in(exc, lambda e: type(e).__name__ == "PreemptionError")


def train_processes(prepared: PreparedRun, resume_from: Path | None = None) -> RunDir:
    """Run the plan's workers as local processes in a plain torch.distributed group (no Ray)."""
    from vray.train.local import run_workers

    write_run_files(prepared)
    with tempfile.TemporaryDirectory(prefix="vray-rows-") as rows:  # the local processes map the rows from here
        run_workers(worker_config(prepared, resume_from, rows_in=rows), prepared.plan.num_workers,
                    backend="nccl" if prepared.plan.device == "gpu" else "gloo")
    draw_curves(prepared.run)
    return prepared.run


def train_local(prepared: PreparedRun, resume_from: Path | None = None) -> RunDir:
    """Run the same worker code in this process, without Ray (a single worker)."""
    write_run_files(prepared)
    with tempfile.TemporaryDirectory(prefix="vray-rows-") as rows:
        train_worker(worker_config(prepared, resume_from, rows_in=rows))
    draw_curves(prepared.run)
    return prepared.run
