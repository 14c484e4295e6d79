"""The driver's decisions before any work starts: the spec resolved, every data row checked, the plan, the run
directory's files (spec.yaml, plan.json, data_check.json) and what each worker receives.

Nothing here starts Ray or a worker (the data check uses Ray's CPUs when the caller has joined or started it);
`vray.train.launcher` runs what this module decided.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from vray.data.pipeline import SampleRows
from vray.data.sample import Sample
from vray.errors import DataError, PlanError, VrayError
from vray.plan.plan import Plan
from vray.spec import RunSpec, require_for_training, token_budget
from vray.storage.rundir import RunDir
from vray.storage.shared import require_shared_storage
from vray.train.loop import WorkerConfig


@dataclass(frozen=True)
class PreparedRun:
    """A resolved spec, its plan and where its data and outputs live."""

    spec: RunSpec
    plan: Plan
    run: RunDir
    train_path: str
    eval_path: str | None
    data: DataCheck
    skip_invalid: bool = False  # --skip-invalid: also what workers do with a sample that stops decoding mid-run


def data_paths(spec: RunSpec) -> tuple[str, str | None]:
    """(train, eval) dataset paths or URIs; `synthetic:` datasets are written on first use."""
    from vray.data import synthetic

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


@dataclass(frozen=True)
class DataCheck:
    """What the driver's check of the data decided."""

    reports: tuple[Any, ...]
    exclude_ids: tuple[str, ...]
    skipped_rows: int
    samples: dict[str, list[Sample]]  # the samples workers train and evaluate on, by dataset path: every valid one


def check_data(spec: RunSpec, train: str, eval_path: str | None, skip_invalid: bool, console: Console | None,
               use_ray: bool = False) -> DataCheck:
    """Check every row of the training and held-out data before anything starts; refuse errors unless told to
    skip them, and then count and report every skipped row. With `use_ray` (Ray is up), the rows are checked as
    Ray tasks on the cluster's CPUs; a file whose report is in vray's cache (same bytes, media and settings) is
    not checked again."""
    from vray.data.check import check_dataset, counting_processor, shown_progress
    from vray.data.io import read_samples
    processor, _ = counting_processor(spec.model.source or spec.arch.repo_id, spec.model.revision, spec.media,
                                      spec.arch)
    budget = token_budget(spec)
    reports, parsed = [], {}
    for uri in (train, eval_path):
        if not uri:
            continue
        parsed[uri] = read_samples(uri, task=spec.effective_task)  # the one time the rows are read on the driver
        with shown_progress(console, f"checking {Path(parsed[uri].source).name}") as progress:
            report = check_dataset(uri, spec.arch, processor, task=spec.effective_task, max_tokens=budget,
                                   max_frames=spec.media.maxFrames, system_prompt=spec.systemPrompt,
                                   parsed=parsed[uri], progress=progress, use_ray=use_ray,
                                   media_limits=spec.media.model_dump(mode="json"))
        if report.cached and console is not None:
            console.print(f"data check of {report.source}: unchanged since it was last checked, its report is "
                          f"cached ({report.cached})", highlight=False)
        reports.append(report)
    if spec.data.packTokens and train in parsed:
        _refuse_longer_than_a_row(reports[0], parsed[train], spec.data.packTokens)
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
    exclude = tuple(sorted({i for r in reports for i in r.invalid_ids}))
    return DataCheck(tuple(reports), exclude, skipped, {uri: result.kept(exclude) for uri, result in parsed.items()})


def _refuse_longer_than_a_row(report: Any, parsed: Any, pack: int) -> None:
    """A training sample longer than data.packTokens is an error of its row: one packed row must hold it whole."""
    from vray.data.check import Issue

    ids = dict(zip(parsed.wheres, (s.id for s in parsed.samples)))
    over = [(where, n) for where, n in zip(report.token_rows, report.tokens) if n > pack]
    longest = max((n for _, n in over), default=0)
    for where, n in over:
        report.issues.append(Issue(where, "error", "longer than data.packTokens",
                                   f"{n} tokens, longer than data.packTokens ({pack}): a packed row holds whole samples; "
                                   f"set data.packTokens to at least {longest} (or 0: no packing), or shorten the "
                                   "sample (media.maxPixels, fewer turns)", ids.get(where)))


def data_sizes(data: DataCheck, train: str) -> Any:
    """What the plan sizes for, from the data check of the training set: the longest kept sample's tokens and its
    row, the mean, the most images one sample has; None when no token was counted."""
    from vray.plan.planner import DataSizes

    report = data.reports[0]
    refused = {i.where for i in report.errors}
    counted = [(n, where) for n, where in zip(report.tokens, report.token_rows or [""] * len(report.tokens))
               if where not in refused]
    if not counted:
        return None
    longest, where = max(counted)
    samples = data.samples[train]
    return DataSizes(max_tokens=longest, mean_tokens=sum(n for n, _ in counted) / len(counted),
                     max_images=max((len(s.images) for s in samples), default=0),
                     video=any(s.videos for s in samples), longest=where or Path(report.source).name,
                     counted_with=report.token_counts)


def gpu_inventory(spec: RunSpec) -> Any:
    """The GPUs a run may use: the spec's cluster block, else the Ray cluster it will join, else this machine."""
    from vray.cluster import cluster_gpu_inventory, local_gpu
    from vray.plan.gpus import Inventory

    named = Inventory.for_spec(spec)
    if named is not None:
        return named
    if os.environ.get("RAY_ADDRESS"):  # a cluster (ray job submit sets it): plan for its GPUs
        return cluster_gpu_inventory(os.environ["RAY_ADDRESS"])
    local = local_gpu()
    if local is not None:
        return Inventory(local[0], local[1], 1)
    return None


def plan_for(spec: RunSpec, dataset: tuple[int, str] | None = None, data: Any = None) -> Plan:
    """The plan for the GPUs the run may use, or CPU workers when there are none. A PlanError when it does not fit.
    `dataset` is (training samples, where the number comes from); without it the training file is counted. `data`
    (vray.plan.planner.DataSizes, from the data check) is what activations are sized for."""
    from vray.data.io import count_rows
    from vray.plan.planner import cpu_plan, cpu_profile, plan_run, sample_of

    inventory = gpu_inventory(spec)
    if inventory is None:
        if data is None:
            return cpu_plan(spec)
        profile = cpu_profile(spec)  # the checkpoint the CPU workers load, sized for the data's longest sample
        return cpu_plan(spec, sample=sample_of(spec, profile, data), profile=profile)
    plan = plan_run(spec, inventory, dataset or count_rows(spec.data.train), data)
    if not plan.fits:
        lines = "\n".join(f"  - {s}" for s in plan.suggestions)
        raise PlanError(f"{plan.reason}" + (f"\nwhat would fit:\n{lines}" if lines else "") + "\n(`vray plan` shows the breakdown)")
    return plan


def plan_checked(spec: RunSpec, inventory: Any, skip_invalid: bool = False, console: Console | None = None) -> Plan:
    """`vray plan`'s plan: with local training data (a file or a synthetic dataset), its rows checked first (as
    `vray train` does) and the plan sized for them; otherwise for the assumed sample (remote data is checked by
    `vray train`, on the cluster's CPUs). Not refused when it does not fit (the caller shows why)."""
    from vray.data.io import count_rows
    from vray.plan.planner import plan_run

    if not spec.data.train or "://" in spec.data.train:
        return plan_run(spec, inventory, count_rows(spec.data.train))
    train, eval_path = data_paths(spec)
    data = check_data(spec, train, None, skip_invalid, console)
    kept = data.samples[train]
    return plan_run(spec, inventory, (len(kept), f"rows of {Path(data.reports[0].source).name} the data check kept")
                    if kept else count_rows(train), data_sizes(data, train))


def require_model(spec: RunSpec, use_ray: bool = False) -> None:
    """Refuse a model the workers could not load, before any work, where it will be loaded: on a cluster this
    process joined (`use_ray`), in one Ray task with the workers' environment, so a driver without hub access does
    not refuse a cluster that has it; on this machine for a local cluster it started, or without Ray."""
    from vray.cluster import joined_cluster, on_a_worker
    from vray.models.loader import require_source

    source = spec.model.source or spec.arch.repo_id
    if use_ray and joined_cluster():
        on_a_worker(require_source, source, spec.model.revision)
    else:
        require_source(source, spec.model.revision)


def prepare(spec: RunSpec, resume: bool = False, skip_invalid: bool = False, console: Console | None = None,
            use_ray: bool = False) -> PreparedRun:
    """Everything checked and decided before any work starts: spec, model, data (every row), plan, run directory.
    With `use_ray`, the caller has started or joined Ray: the model is checked on a worker, and the data check runs
    as Ray tasks on its CPUs."""
    require_for_training(spec)
    spec = spec.resolved()
    run = RunDir.of(spec.run_dir)
    if run.exists("spec.yaml") and not resume:
        raise VrayError(f"run directory {run.uri} already exists; set another name, or resume it with --resume {run.uri}")
    require_model(spec, use_ray)
    train, eval_path = data_paths(spec)
    data = check_data(spec, train, eval_path, skip_invalid, console, use_ray)
    kept = data.samples[train]
    plan = plan_for(spec, (len(kept), f"rows of {Path(data.reports[0].source).name} the data check kept"),
                    data_sizes(data, train))
    if plan.device == "gpu":  # a CPU plan's "nodes" are fsdp2-hybrid replica groups, packed wherever Ray puts them
        require_shared_storage(run.uri, plan.nodes)
    return PreparedRun(spec, plan, run, train, eval_path, data, skip_invalid)


def worker_config(prepared: PreparedRun, resume_from: Path | None = None, rows_in: str | Path | None = None) -> WorkerConfig:
    """What every worker of the run receives: the spec and plan, and the checked samples of its datasets, packed
    once: into Ray's object store (workers anywhere on the cluster), or into the folder `rows_in` on this machine
    (workers that run here)."""
    def rows(split: str, uri: str) -> SampleRows:
        samples = prepared.data.samples[uri]
        if rows_in is None:
            return SampleRows.in_object_store(uri, samples)
        return SampleRows.in_folder(uri, samples, Path(rows_in) / split)

    return WorkerConfig(
        spec=prepared.spec, plan=prepared.plan, run_dir=prepared.run.uri, train=rows("train", prepared.train_path),
        eval=rows("eval", prepared.eval_path) if prepared.eval_path else None,
        resume_from=str(resume_from) if resume_from else None, skip_invalid=prepared.skip_invalid,
    )


def write_run_files(prepared: PreparedRun) -> None:
    """spec.yaml (resolved), plan.json and data_check.json (what the data check found and skipped)."""

    run = prepared.run
    if run.local:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    run.write_text("spec.yaml", prepared.spec.to_yaml())
    run.write_text("plan.json", prepared.plan.to_json() + "\n")
    reports = [json.loads(r.to_json()) for r in prepared.data.reports]
    run.write_text("data_check.json", json.dumps({"skipped_rows": prepared.data.skipped_rows,
                                                  "excluded_ids": list(prepared.data.exclude_ids),
                                                  "datasets": reports}, indent=2) + "\n")
