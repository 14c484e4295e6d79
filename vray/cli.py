"""The `vray` command: parses arguments and delegates to the modules; user errors print without a traceback."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from vray.errors import VrayError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Fine-tune and serve vision-language models on Ray.")
# Messages are not wrapped when stderr is a file or a pipe (logs, CI): one problem stays one line.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
# Piped output is not wrapped at 80 columns: tables stay one row per checkpoint.
out = Console(width=None if sys.stdout.isatty() else 200)


def _quiet_libraries() -> None:
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@app.command()
def archs(as_json: bool = typer.Option(False, "--json", help="print the list as JSON (with exact parameter counts)")) -> None:
    """List the supported checkpoints (parameter counts from the real configs on the meta device)."""
    from vray.models.summary import archs_json

    rows = archs_json()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} supported checkpoints")
    for col in ("name", "size", "repo_id", "model_type", "params", "active", "vision", "LoRA", "boxes", "verified"):
        table.add_column(col, justify="right" if col in ("params", "active", "vision") else "left", no_wrap=True)
    for r in rows:
        p = r["params"]
        table.add_row(r["name"], r["size"], r["repo_id"], r["model_type"], f"{p['total'] / 1e9:.2f}B",
                      f"{p['active'] / 1e9:.2f}B", f"{p['vision'] / 1e9:.2f}B", "yes" if r["lora_supported"] else "no",
                      r["box_convention"], ("yes" if r["verified"] else "no") + (" *" if r["assumed"] else ""))
    out.print(table)
    out.print("* some config values are assumptions; `vray archs --json` lists them under `assumed`")


@app.command()
def train(
    spec_file: Optional[Path] = typer.Argument(None, help="run spec (YAML)"),
    run_json: Optional[Path] = typer.Option(None, "--run-json", help="a saved run.json: its model block"),
    task: Optional[str] = typer.Option(None, help="phrase_grounding | vqa | freeform"),
    data: Optional[str] = typer.Option(None, help="training data: JSONL path or synthetic:<task>"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="held-out data: JSONL path"),
    output: Optional[str] = typer.Option(None, help="parent folder of run directories"),
    set_: list[str] = typer.Option([], "--set", help="override any key: --set hyperparameters.epochs=3"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a run directory from its latest checkpoint"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="train without the rows the data check refuses "
                                      "(each is counted and listed in data_check.json)"),
    verbose: bool = typer.Option(False, "--verbose", help="stream worker logs"),
) -> None:
    """Fine-tune on Ray Train; prints the run directory as the last line."""
    _quiet_libraries()
    from vray import jobs
    from vray.cluster import ensure_ray
    from vray.spec import load_spec
    from vray.train.launcher import run_training
    from vray.train.prepare import prepare

    resume_from = None
    if resume is not None:
        from vray.storage.rundir import RunDir

        run = RunDir.of(resume)
        if not run.spec.exists():
            raise VrayError(f"--resume {resume}: not a run directory (no spec.yaml)")
        spec = load_spec(run.spec, overrides=set_)
        resume_from = run.latest_checkpoint()
        ensure_ray(verbose)  # the run is on Ray: the data check runs on its CPUs too
        prepared = prepare(spec, resume=True, skip_invalid=skip_invalid, console=err, use_ray=True)
    else:
        spec = load_spec(spec_file, run_json=run_json, overrides=set_, task=task, data=data, eval_data=eval_data,
                         output=output)
        ensure_ray(verbose)
        prepared = prepare(spec, skip_invalid=skip_invalid, console=err, use_ray=True)
    err.print(f"{jobs.RUN_DIR_LINE}{prepared.run.uri}", markup=False, highlight=False)
    err.print(f"run {prepared.spec.name}: {prepared.spec.arch.display} {prepared.spec.trainingMode.type}, "
              f"{prepared.plan.strategy} over {prepared.plan.num_workers} {prepared.plan.device.upper()} worker(s), "
              f"micro-batch {prepared.plan.micro_batch} x accumulation {prepared.plan.grad_accum}; sized for "
              f"{prepared.plan.assumptions.get('sample_from', 'the assumed sample')}")
    run = run_training(prepared, err, resume_from=resume_from, verbose=verbose)
    best = run.best_checkpoint()
    if best is not None:
        err.print(f"best checkpoint: {best.name}")
    typer.echo(run.uri)


@app.command()
def plan(
    spec_file: Optional[Path] = typer.Argument(None, help="run spec (YAML)"),
    run_json: Optional[Path] = typer.Option(None, "--run-json", help="a saved run.json: its model block"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU kind: T4-16GB, L4-24GB, A10G-24GB, A100-40GB, A100-80GB, "
                                      "H100-80GB, H200-141GB, B200-192GB"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="GPUs per node (default 8)"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="nodes available (default: as many as needed)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="more workers than the minimum, to go faster"),
    from_cluster: Optional[str] = typer.Option(None, "--from-cluster", help="plan for the GPUs of a running Ray cluster"),
    set_: list[str] = typer.Option([], "--set", help="override any key of the spec"),
    as_json: bool = typer.Option(False, "--json", help="print the plan object"),
    table: bool = typer.Option(False, "--table", help="the architecture-to-VRAM table of all 21 checkpoints"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="plan without the rows the data check refuses"),
) -> None:
    """Size a run: GPUs, strategy, batch split and placement, with the per-GPU memory breakdown. Exit 2 if it does not fit."""
    _quiet_libraries()
    if table:
        _print_vram_table(as_json)
        return
    from vray.cluster import inventory_from_cluster
    from vray.plan.gpus import Inventory
    from vray.spec import load_spec
    from vray.train.prepare import plan_checked

    spec = load_spec(spec_file, run_json=run_json, overrides=set_)
    if workers is not None:
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"workers": workers})})
    if from_cluster:
        inventory = inventory_from_cluster(from_cluster, gpu)
    else:
        inventory = Inventory.for_spec(spec, gpu, gpus_per_node, nodes)
        if inventory is None:
            raise VrayError("give --gpu KIND (or cluster.gpu in the spec), or --from-cluster ADDRESS")
    result = plan_checked(spec, inventory, skip_invalid, console=err)
    if as_json:
        typer.echo(result.to_json())
    else:
        _print_plan(spec, inventory, result)
    if not result.fits:
        raise typer.Exit(2)


def _print_plan(spec, inventory, result) -> None:  # noqa: ANN001 - RunSpec, Inventory, Plan (imported lazily)
    gib = 1024**3
    a = result.assumptions
    mode = spec.trainingMode.type + (f" + {spec.quantization.type}" if spec.quantization.enabled else "")
    out.print(f"[bold]{spec.arch.display}[/bold] ({spec.arch.repo_id}): {mode}, {spec.compute.precisionType}, "
              f"{spec.hyperparameters.optimizer}; effective batch {spec.hyperparameters.effective_batch}")
    out.print(f"inventory: {inventory.describe()}")
    out.print(f"sample: {a['sample']} -> {a['visual_tokens']} visual tokens, sequence {a['sequence']}; sized from "
              f"{a['sample_from']}")
    if a.get("assumed_config_fields"):
        out.print(f"[yellow]assumed config fields: {', '.join(a['assumed_config_fields'])}[/yellow]")
    if not result.fits:
        out.print(f"[bold red]does not fit:[/bold red] {result.reason}")
        for s in result.suggestions:
            out.print(f"  - {s}")
        return
    m = result.per_gpu_bytes
    rows = Table(title=f"per GPU ({result.gpu})")
    rows.add_column("")
    rows.add_column("GiB", justify="right")
    for label, value in (("weights", m.weights), ("gradients", m.gradients), ("optimizer", m.optimizer),
                         ("activations", m.activations), ("other", m.other), ("total", m.total),
                         ("margin", result.margin_bytes), ("capacity", result.capacity_bytes),
                         ("headroom", result.capacity_bytes - result.margin_bytes - m.total)):
        rows.add_row(label, f"{value / gib:.2f}")
    out.print(rows)
    if result.load_peak_bytes:
        load = result.load_peak_bytes
        out.print(f"load peak (while the model loads): {load.per_gpu / gib:.2f} GiB per GPU, "
                  f"{load.per_host / gib:.1f} GiB of host memory per node "
                  f"(node: {inventory.host_memory_per_gpu * inventory.gpus_per_node / gib:.0f} GiB)")
    gc = "off"
    if result.gradient_checkpointing:
        gc = "on (every layer)" if result.checkpoint_every == 1 else f"every {result.checkpoint_every} layers"
    packed = f"; packed rows of {result.pack_tokens} tokens" if result.pack_tokens else "; padded micro-batches"
    out.print(f"plan: [bold]{result.strategy}[/bold] on {result.num_workers} GPU(s) over {result.nodes} node(s); "
              f"micro-batch {result.micro_batch} x accumulation {result.grad_accum} x {result.num_workers} worker(s) "
              f"= {result.effective_batch}; gradient checkpointing {gc}{packed}")
    fewest = result.layouts.get("minimum")
    if fewest and fewest["num_workers"] != result.num_workers:
        out.print(f"fewest GPUs: {fewest['num_workers']} ({fewest['strategy']}, {fewest['step_seconds']:.2f} s/step, "
                  f"{fewest['gpu_hours']:.2f} GPU-hours)")
    if a.get("cpu_bytes_per_rank"):
        out.print(f"offloaded to CPU memory: {a['cpu_bytes_per_rank'] / gib:.1f} GiB per GPU rank "
                  f"({a['cpu_bytes_per_rank'] * min(result.num_workers, result.gpus_per_node) / gib:.0f} GiB per node)")
    e = result.estimate
    out.print(f"estimate: {e['step_seconds']:.2f} s/step, {e['steps']} steps, {e['hours']:.2f} h, "
              f"{e['gpu_hours']:.2f} GPU-hours (assumed MFU {e['mfu']}, {a['dataset_samples']} samples: "
              f"{a['dataset_samples_from']})")


def _print_vram_table(as_json: bool) -> None:
    from vray.plan.gpus import CATALOG
    from vray.plan.vram_table import TABLE_ASSUMPTIONS, vram_table

    rows = vram_table()
    if as_json:
        typer.echo(json.dumps({"assumptions": TABLE_ASSUMPTIONS, "rows": rows}, indent=2))
        return
    table = Table(title="GPUs needed per checkpoint and mode (1 = fits on one GPU)")
    for col in ("architecture", "size", "mode", *CATALOG):
        table.add_column(col, justify="left" if col in ("architecture", "size", "mode") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["name"], r["size"] + (" *" if r["assumed"] else ""), r["mode"], *r["gpus"].values())
    out.print(table)
    out.print(TABLE_ASSUMPTIONS)
    out.print("* some config values of this checkpoint are assumptions (see `vray archs --json`)")


@app.command("export")
def export(
    run: str = typer.Argument(..., help="run directory (local or s3://) or checkpoint folder"),
    merge: bool = typer.Option(False, "--merge", help="fold the LoRA adapter into its base (required for LoRA runs)"),
    out: Optional[str] = typer.Option(None, "--out", help="destination folder (default: RUN_DIR/export/merged)"),
    dtype: str = typer.Option("BFloat16", help="BFloat16 | Float16 | Float32"),
) -> None:
    """Write a standalone Hugging Face checkpoint of a run (LoRA merged into the base, or the full weights)."""
    _quiet_libraries()
    from vray.infer.export import export_merged
    from vray.infer.target import resolve_target

    if dtype not in ("BFloat16", "Float16", "Float32"):
        raise VrayError(f"--dtype {dtype!r}: choose BFloat16, Float16 or Float32")
    target = resolve_target(run)
    if target.adapter and not merge:
        raise VrayError(f"{run} holds a LoRA adapter: pass --merge to fold it into its base model")
    if out is None:
        if "://" in run:
            raise VrayError("give --out for a remote run directory")
        out = str(Path(run) / "export" / "merged")
    folder = export_merged(run, out, dtype)
    err.print(f"exported {target.model_id} ({target.checkpoint}) as {dtype}")
    typer.echo(str(folder))


@app.command("eval")
def eval_(
    run: str = typer.Argument(..., help="run directory (local or s3://) or checkpoint folder"),
    data: str = typer.Option(..., "--data", help="dataset to score on (JSONL / Parquet / folder, or synthetic:<task>)"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="score the base model too"),
    limit: Optional[int] = typer.Option(None, help="score only the first N samples"),
    batch_size: int = typer.Option(8, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Score a run on a dataset with the task's metrics, next to its base model."""
    _quiet_libraries()
    from vray.infer.evaluate import evaluate_run

    report = evaluate_run(run, data, baseline=baseline, limit=limit, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"{report['samples']} sample(s) of {data} ({report['task']}; {report['checkpoint']})")
    table.add_column("metric")
    if baseline:
        table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for name, value in report["fine_tuned"].items():
        row = [name + (" *" if name == report["primary_metric"] else "")]
        if baseline:
            row.append(f"{report['base'][name]:.4f}")
        table.add_row(*row, f"{value:.4f}")
    out.print(table)


@app.command("predict")
def predict_cmd(
    run: str = typer.Argument(..., help="run directory (local or s3://) or checkpoint folder"),
    data: str = typer.Option(..., "--data", help="dataset to answer (JSONL / Parquet / folder, or synthetic:<task>)"),
    out_path: str = typer.Option(..., "--out", help="predictions file (JSON Lines)"),
    limit: Optional[int] = typer.Option(None, help="only the first N samples"),
    batch_size: int = typer.Option(8, "--batch-size"),
) -> None:
    """Batch predictions: one JSON line per sample (boxes in image pixels for grounding)."""
    _quiet_libraries()
    from vray.infer.evaluate import predict_run

    n = predict_run(run, data, out_path, limit=limit, batch_size=batch_size)
    err.print(f"wrote {n} prediction(s)")
    typer.echo(out_path)


data_app = typer.Typer(no_args_is_help=True, help="Convert and check datasets.")
app.add_typer(data_app, name="data")


@data_app.command("convert")
def data_convert(
    src: str = typer.Argument(..., help="the source file (local or s3://)"),
    from_: str = typer.Option(..., "--from", help="coco | coco-captions | llamafactory | ms-swift | llava | openai"),
    to: str = typer.Option(..., "--to", help="destination folder: data.jsonl (or data.parquet) is written there"),
    parquet: bool = typer.Option(False, "--parquet", help="write data.parquet instead of data.jsonl"),
    copy_images: bool = typer.Option(False, "--copy-images", help="copy images and videos into DEST/media/"),
    task: Optional[str] = typer.Option(None, help="task of chat-format samples (default freeform; boxes make grounding)"),
    images_root: Optional[str] = typer.Option(None, "--images-root", help="folder image paths are relative to "
                                              "(default: the source's folder)"),
) -> None:
    """Convert a dataset in a format you already have into vray samples."""
    from vray.data.importers import convert

    written, result = convert(src, from_, to, parquet=parquet, copy_images=copy_images, task=task, images_root=images_root)
    err.print(f"converted {len(result.samples)} sample(s) from {src} ({from_})")
    for reason, n in result.skipped.most_common():
        err.print(f"  skipped {n}: {reason} (first: {result.examples[reason]})")
    typer.echo(written)


@data_app.command("check")
def data_check(
    dataset: str = typer.Argument(..., help="a vray dataset: JSONL, Parquet or a folder with data.jsonl (local or s3://)"),
    arch: str = typer.Option(..., "--arch", help="the architecture it will train: NAME or NAME:SIZE (e.g. qwen2.5vl:7B)"),
    model: Optional[str] = typer.Option(None, "--model", help="model source whose processor counts tokens "
                                        "(default: the architecture's repo; estimated when out of reach)"),
    task: Optional[str] = typer.Option(None, help="the run's task: rows of another task are errors"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="token budget of a sample (default: the context)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", help="frames a video is sampled down to"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    show: int = typer.Option(50, "--show", help="problems to list (all are in --json)"),
    no_ray: bool = typer.Option(False, "--no-ray", help="check in this process, without Ray"),
    no_cache: bool = typer.Option(False, "--no-cache", help="check again even if the file's report is cached"),
) -> None:
    """Report every problem of every row (missing or corrupt media, bad boxes, empty answers, token budget,
    duplicate ids); exit 1 when there are errors. Rows are checked as Ray tasks on the cluster's CPUs (RAY_ADDRESS,
    a running local cluster, else one started here) when there are more than a batch of them."""
    _quiet_libraries()
    from vray.archs import registry
    from vray.data.check import check_dataset, counting_processor, shown_progress

    name, _, size = arch.partition(":")
    if not size and name in registry.FAMILIES:
        size = registry.FAMILIES[name].recommended_size
    architecture = registry.get(name, size)
    processor, unreachable = counting_processor(model or architecture.repo_id, arch=architecture)
    if unreachable:
        err.print(f"[yellow]token counts are estimated: {unreachable}[/yellow]")
    budget = max_tokens or architecture.context_length
    from vray.cluster import ensure_ray

    with shown_progress(err, "checking") as progress:
        report = check_dataset(dataset, architecture, processor, task=task, max_tokens=budget, max_frames=max_frames,
                               progress=progress, use_ray=not no_ray, start_ray=ensure_ray, cache=not no_cache)
    if report.cached:
        err.print(f"unchanged since it was last checked: the cached report ({report.cached}); --no-cache checks again",
                  highlight=False)
    if as_json:
        typer.echo(report.to_json())
    else:
        summary = report.summary()
        out.print(f"{summary['rows']} row(s) in {summary['source']}: {summary['valid_rows']} valid, "
                  f"{summary['errors']} error(s), {summary['warnings']} warning(s)")
        for kind, n in sorted(summary["by_kind"].items()):
            out.print(f"  {n:6d}  {kind}")
        if summary["tokens"]:
            t = summary["tokens"]
            out.print(f"tokens per sample: median {t['median']}, max {t['max']}, budget {t['budget']} ({t['counted_with']})")
        for issue in report.issues[:show]:
            colour = "red" if issue.severity == "error" else "yellow"
            out.print(f"[{colour}]{issue.severity}[/{colour}] {issue.where}: {issue.message}", highlight=False)
        if len(report.issues) > show:
            out.print(f"... and {len(report.issues) - show} more (--json lists all)")
    if report.errors:
        raise typer.Exit(1)


@app.command()
def serve(
    target: Optional[str] = typer.Argument(None, help="run directory, checkpoint folder, model folder, tiny:<family> or hub repo id"),
    config: Optional[Path] = typer.Option(None, "--config", help="deploy a Ray Serve config file (applications: [...])"),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="write a Ray Serve config for TARGET and exit"),
    engine: str = typer.Option("auto", help="auto (vllm on GPU replicas where vLLM is installed, else transformers), "
                                            "transformers (CPU or GPU) or vllm (GPU; ray.serve.llm)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="HTTP port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VRAY_API_KEY", help="require 'Authorization: Bearer KEY'"),
    detach: bool = typer.Option(False, "--detach", help="deploy into a persistent Ray cluster and return"),
    insecure: bool = typer.Option(False, "--insecure", help="serve without an API key on a non-loopback address, "
                                                            "or from a written config"),
    architecture: Optional[str] = typer.Option(None, help="NAME:SIZE, for a hub model"),
    task: Optional[str] = typer.Option(None, help="task of a base model (phrase_grounding adds boxes)"),
    allow_image_host: list[str] = typer.Option([], "--allow-image-host", help="http(s) image hosts requests may use"),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=RUN: an extra LoRA adapter of the same base, "
                                                            "requested as model '<base>:NAME'"),
    adapters_dir: Optional[str] = typer.Option(None, "--adapters-dir", help="folder or s3:// prefix of runs of the "
                                                                             "same base, each servable as '<base>:<run>'"),
    gpu: Optional[str] = typer.Option(None, help="GPU kind of a replica (sizes GPUs per replica); 'none' for CPU"),
    min_replicas: Optional[int] = typer.Option(None, "--min-replicas"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas"),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", help="requests generated together (1: off)"),
    serving: list[str] = typer.Option([], "--serving", help="KEY=VALUE of the spec's serving block (repeatable)"),
    merge: bool = typer.Option(False, "--merge", help="vllm: serve the adapter merged into its base"),
    lora_prefix: Optional[str] = typer.Option(None, "--lora-prefix", help="vllm: s3:// prefix to publish the adapter to"),
    verbose: bool = typer.Option(False, "--verbose", help="stream replica logs"),
) -> None:
    """Deploy a model on Ray Serve behind an OpenAI-compatible HTTP API (or write / deploy a Serve config)."""
    _quiet_libraries()
    from vray.serve import command

    if config is not None:
        if target or write_config:
            raise VrayError("--config deploys a Serve config file as it is; give no TARGET or --write-config with it")
        urls = command.serve_config_file(config, detach=detach, insecure=insecure, verbose=verbose, console=err)
        if detach:
            typer.echo("\n".join(urls))
        return
    if not target:
        raise VrayError("give a TARGET (run directory, checkpoint, model folder or source), or --config FILE")
    overrides = command.serving_overrides(serving, min_replicas=min_replicas, max_replicas=max_replicas,
                                          max_batch_size=max_batch_size, gpu=gpu)
    app_args = command.app_args(target, architecture=architecture, task=task, allowed_image_hosts=tuple(allow_image_host),
                                adapters=command.named_adapters(adapter), adapters_dir=adapters_dir, serving=overrides,
                                insecure=insecure)
    served = command.serve(app_args, given=target, engine=engine, host=host, port=port, api_key=api_key, detach=detach,
                           insecure=insecure, verbose=verbose, merge=merge, lora_prefix=lora_prefix,
                           write_config=write_config, console=err)
    if served.written is not None:
        typer.echo(str(served.written))
    elif detach:
        typer.echo(served.url)


@app.command()
def submit(
    spec_file: Optional[Path] = typer.Argument(None, help="run spec inside the working directory (jobs/<spec>.yaml)"),
    address: Optional[str] = typer.Option(None, "--address", help="the cluster's dashboard, http://HEAD:8265 "
                                                                  "(default: RAY_API_SERVER_ADDRESS)"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="uploaded with the job, as ray job submit does"),
    pip: list[str] = typer.Option([], "--pip", help="a pip requirement to install for the job (repeatable; only when "
                                                     "the cluster image lacks it)"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    set_: list[str] = typer.Option([], "--set", help="override a key of the spec"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id"),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the submission id and return"),
    resume: Optional[str] = typer.Option(None, "--resume", help="continue a run directory (as the cluster reaches "
                                         "it) from its latest checkpoint: the job runs vray train --resume RUN_DIR"),
) -> None:
    """Submit `vray train SPEC` to a Ray cluster as a job (storage and HF_TOKEN variables go with it); follow its logs."""
    from vray import jobs

    extra = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VrayError(f"--env {item!r}: use KEY=VALUE")
        extra[key] = value
    if (spec_file is None) == (resume is None):
        raise VrayError("give either the spec file to submit (jobs/<spec>.yaml) or --resume RUN_DIR")
    client, job_id = jobs.submit(str(spec_file) if spec_file else None, address, str(working_dir), pip, set_,
                                 submission_id, extra, resume)
    err.print(f"submitted {job_id} to {jobs.dashboard_address(address)}; `vray jobs logs {job_id}` follows it, "
              f"`vray jobs stop {job_id}` stops it")
    typer.echo(job_id)
    if no_wait:
        return
    status = jobs.follow(client, job_id, typer.echo)
    err.print(f"job {job_id}: {status}")
    if status != "SUCCEEDED":
        raise typer.Exit(1)


jobs_app = typer.Typer(no_args_is_help=True, help="Follow, inspect and stop jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")
_ADDRESS = typer.Option(None, "--address", help="http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)")


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(...), address: Optional[str] = _ADDRESS) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and message."""
    from vray import jobs

    client = jobs.client(address)
    info = client.get_job_info(job_id)
    status = str(info.status).rsplit(".", 1)[-1]
    logs = client.get_job_logs(job_id) if status in ("FAILED", "STOPPED") else ""
    status, lines = jobs.status_lines(info, logs, address)
    typer.echo(status)
    for line in lines:
        err.print(line, markup=False, highlight=False)


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(...), address: Optional[str] = _ADDRESS,
              follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the job ends")) -> None:
    """Print a job's logs."""
    from vray import jobs

    client = jobs.client(address)
    if follow:
        jobs.follow(client, job_id, typer.echo)
    else:
        typer.echo(client.get_job_logs(job_id).rstrip("\n"))


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(...), address: Optional[str] = _ADDRESS) -> None:
    """Stop a running job and wait until it has stopped."""
    from vray import jobs

    client = jobs.client(address)
    client.stop_job(job_id)
    typer.echo(jobs.wait(client, job_id, timeout_s=120))


@jobs_app.command("list")
def jobs_list(address: Optional[str] = _ADDRESS) -> None:
    """The cluster's jobs, newest last."""
    from vray import jobs

    table = Table("submission id", "status", "entrypoint")
    for info in sorted(jobs.client(address).list_jobs(), key=lambda j: j.start_time or 0):
        table.add_row(info.submission_id or info.job_id or "", str(info.status).rsplit(".", 1)[-1], info.entrypoint)
    out.print(table)


k8s_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests rendered from a spec and its plan.")
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    spec_file: Optional[Path] = typer.Argument(None, help="run spec (jobs/<spec>.yaml)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU kind of the worker nodes"),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="nodes available (default: as many as the plan needs)"),
    kind: list[str] = typer.Option([], "--kind", help="raycluster, rayjob, rayservice (default: all that apply)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for <kind>.yaml (default: print them)"),
    image: Optional[str] = typer.Option(None, "--image", help="container image with vray (default: vray:<version>, "
                                                              "built from cluster/Dockerfile)"),
    name: Optional[str] = typer.Option(None, "--name", help="resource and run name (default: the spec's)"),
    namespace: Optional[str] = typer.Option(None, "--namespace"),
    working_dir: Optional[str] = typer.Option(None, "--working-dir", help="RayJob runtime_env working_dir URL"),
    cluster_selector: Optional[str] = typer.Option(None, "--cluster", help="run the RayJob on this existing RayCluster"),
    efa: int = typer.Option(0, "--efa", help="EFA interfaces per GPU pod (vpc.amazonaws.com/efa; the image needs "
                                             "cluster/Dockerfile's EFA build)"),
    rdma: list[str] = typer.Option([], "--rdma", help="RESOURCE=COUNT: an RDMA device plugin's resource per GPU pod, "
                                                      "e.g. rdma/rdma_shared_device_a=1 (repeatable)"),
    set_: list[str] = typer.Option([], "--set", help="override a key of the spec"),
    catalog: Optional[Path] = typer.Option(None, "--catalog", help="re-render every entry of cluster/manifests.yaml"),
) -> None:
    """Render a RayCluster, a RayJob and a RayService for a spec, checked against the KubeRay CRD schemas."""
    _quiet_libraries()
    from vray.k8s import render_catalog, render_spec
    from vray.k8s.render import to_yaml, write

    if catalog is not None:
        for rendered in render_catalog(catalog):
            for path in write(rendered.manifests, rendered.folder, rendered.command):
                typer.echo(str(path))
        return
    if spec_file is None:
        raise VrayError("give a SPEC_FILE (or --catalog cluster/manifests.yaml)")
    manifests, command = render_spec(str(spec_file), gpu, gpus_per_node, nodes, tuple(kind) or None, image, name,
                                     namespace, working_dir, cluster_selector, set_, efa, tuple(rdma))
    if out_dir is None:
        typer.echo("---\n".join(to_yaml(m, command) for m in manifests.values()))
        return
    for path in write(manifests, out_dir, command):
        typer.echo(str(path))


@app.command()
def demo(
    output: Optional[str] = typer.Option(None, help="parent folder of the demo's run directory"),
    set_: list[str] = typer.Option([], "--set", help="override a key of the embedded spec"),
    keep_serving: bool = typer.Option(False, "--keep-serving", help="leave the endpoint up until Ctrl-C"),
    port: Optional[int] = typer.Option(None, help="HTTP port (default: a free one)"),
) -> None:
    """Fine-tune tiny:qwen2_5_vl on synthetic:vqa with Ray, serve it, and query it over HTTP."""
    _quiet_libraries()
    from vray.demo import run_demo

    result = run_demo(out, output=output, overrides=set_, keep_serving=keep_serving, port=port)
    if result.exact_match_after <= result.exact_match_before:
        raise VrayError(
            f"the fine-tuned model did not beat the untrained one ({result.exact_match_after:.3f} vs "
            f"{result.exact_match_before:.3f}); see {result.run_dir}/curves.png"
        )


def main() -> None:
    """Console entry point."""
    try:
        app()
    except VrayError as exc:
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
