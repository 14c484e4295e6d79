"""The per-worker training recipe: one loop, read top to bottom; strategy specifics live in the engines.

`Recipe(config, reporter).setup()` builds the model, the data, the engine (wrapping and optimizer) and the
scheduler, in that order, then restores a checkpoint; `train()` runs the epochs with evaluation and checkpoints
(written through `vray.storage.checkpoint`) beside it. It runs under Ray Train (the TorchTrainer's
`train_func`) or in a plain process, with or without a torch.distributed process group.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from vray.archs.registry import Architecture
from vray.cluster import in_ray_train_worker
from vray.data import metrics as task_metrics
from vray.data.collate import Collator, Encoded, pack_in_order, skip_record
from vray.data.pipeline import DataOrder, SampleRows, SampleStream, WorkerData
from vray.errors import DataError, VrayError
from vray.models import kernels
from vray.models.generate import GenerationSettings, generate_texts
from vray.models.loader import (
    DTYPES,
    load_processor,
    parameter_groups,
    prepare_for_training,
    resolve_source,
    trainable_parameters,
)
from vray.models.packing import prepare_for_packing, sample_positions
from vray.models.sharded import materialize_sharded
from vray.plan.plan import Plan
from vray.spec import MediaBlock, RunSpec, token_budget
from vray.storage.checkpoint import CheckpointWriter
from vray.storage.rundir import RunDir, fetch_checkpoint, read_checkpoint_info
from vray.train.engines import (
    Engine,
    all_gather_names,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    all_reduce_sum_,
    barrier,
    build_engine,
    evaluating,
    gather_fits,
    shard_units,
    world,
)
from vray.train.label_loss import LossHead
from vray.train.loss import answer_tokens
from vray.train.tracking import MetricsLog, StepRecord

DATA_REPORT = "data_report.json"  # the samples that stopped decoding after the data check (rank 0 writes it)
TRAINING_STATE = "training_state.pt"  # rank 0: scheduler, step, best metric
RNG_STATE = "rng-rank{rank}.pt"  # every rank: its own CPU, CUDA, Python and NumPy random streams


class Reporter(Protocol):
    """Where a worker reports metrics and checkpoints (Ray Train, or nothing in a plain process)."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...

    def restore_from(self) -> Path | None: ...

    def preempted(self) -> dict[str, Any] | None:
        """A preemption notice for this run's nodes ({"deadline": ISO time or None, "nodes": [...], "ranks": [...]}),
        else None. Every rank calls it once per optimizer step (under Ray Train it is a collective)."""
        ...


class LocalReporter:
    """A plain process: checkpoints are already in the run directory; resume from `resume_from` if given."""

    def __init__(self, resume_from: Path | None = None):
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        return None

    def restore_from(self) -> Path | None:
        return self.resume_from

    def preempted(self) -> dict[str, Any] | None:
        return None  # no cluster tells a plain process that its machine goes away


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs. It crosses process boundaries pickled (Ray's train_loop_config, spawned local
    processes): the resolved spec and the plan as they are, and the rows the driver's check kept."""

    spec: RunSpec
    plan: Plan
    run_dir: str
    train: SampleRows
    eval: SampleRows | None
    resume_from: str | None = None
    skip_invalid: bool = False  # a sample that stops decoding mid-run: skip and report it, else stop at a checkpoint

    def data(self, rank: int, world: int) -> WorkerData:
        """What rank `rank` of `world` reads of the checked datasets: its rows in the run's seeded order."""
        order = DataOrder(len(self.train), self.plan.effective_batch, self.plan.micro_batch, self.spec.seed, rank,
                          world)
        return WorkerData.read(self.train, self.eval, order, self.spec.hyperparameters.epochs)


@dataclass(frozen=True)
class CollatorFactory:
    """Builds the run's collator wherever preprocessing runs (a training worker or a Ray Data actor)."""

    source: str
    revision: str | None
    arch: Architecture
    system_prompt: str | None
    media: MediaBlock
    max_tokens: int | None

    @classmethod
    def of(cls, spec: RunSpec) -> CollatorFactory:
        """The collator a run's spec asks for (the model's processor, the sample's token budget)."""
        arch = spec.arch
        return cls(spec.model.source or arch.repo_id, spec.model.revision, arch, spec.systemPrompt, spec.media,
                   token_budget(spec))

    def __call__(self) -> Collator:
        from vray.models.loader import resolve_processor_source

        processor = load_processor(resolve_processor_source(self.source, self.revision), self.media, arch=self.arch)
        return Collator(processor, self.arch, self.system_prompt, max_tokens=self.max_tokens,
                        max_frames=self.media.maxFrames)


def _device(plan: Plan) -> torch.device:
    """This worker's device: its GPU under Ray Train or torchrun (LOCAL_RANK), else the CPU."""
    if plan.device != "gpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        import ray.train.torch

        device = ray.train.torch.get_device()
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def pack_budget(spec: RunSpec, plan: Plan) -> int | None:
    """Tokens of one packed row: `data.packTokens` (0: no packing), else the plan's; None means padded
    micro-batches."""
    tokens = spec.data.packTokens if spec.data.packTokens is not None else plan.pack_tokens
    return tokens or None


def router_aux_coef(spec: RunSpec, model_config: Any) -> float:
    """Weight of the MoE router's load-balancing loss in the training objective: sparse-MoE families under full
    fine-tuning only (LoRA leaves the router frozen); `full.routerAuxLossCoef`, else the checkpoint's
    `router_aux_loss_coef`. 0 means no aux loss (and no router logits are returned)."""
    if not (spec.arch.is_moe and spec.trainingMode.type == "Full"):
        return 0.0
    if spec.full.routerAuxLossCoef is not None:
        return spec.full.routerAuxLossCoef
    text = getattr(model_config, "text_config", None) or model_config
    return float(getattr(text, "router_aux_loss_coef", None) or 0.0)


def build_optimizer(name: str, params: list[Any], lr: float, weight_decay: float,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The optimizer a spec names (the fused CUDA kernels on a GPU: no temporaries in the step)."""
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    raise ValueError(f"unknown optimizer {name}")


class Recipe:
    """Fine-tunes one model on one dataset as the spec and plan say."""

    def __init__(self, config: WorkerConfig, reporter: Reporter):
        self.config = config
        self.reporter = reporter
        self.spec = config.spec
        self.plan = config.plan
        self.arch = self.spec.arch
        self.run = RunDir.of(config.run_dir)
        self.rank, self.world_size = world()
        self.device = _device(self.plan)
        self.task = self.spec.effective_task or "vqa"
        self.primary = task_metrics.PRIMARY_METRIC[self.task]
        self.step = 0
        self.best_metric: float | None = None
        self._pending: StepRecord | None = None  # a GPU step's record, written once the next step is queued
        self._skips: list[dict[str, Any]] = []  # this rank's stand-ins since the last checkpoint
        self._skipped: dict[str, dict[str, Any]] = {}  # rank 0: every skipped sample of the run, by id (the report)
        self.metrics_log = MetricsLog(self.run, self.rank)
        self.checkpoints = CheckpointWriter(self.run, self.rank, barrier, self.world_size)
        self.metrics_log.last_checkpoint = lambda: self.checkpoints.last_complete

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Model, data, engine (wrapping and optimizer), scheduler, in that order; then restore a checkpoint."""
        torch.manual_seed(self.spec.seed)
        random.seed(self.spec.seed)
        restore = self.reporter.restore_from()
        local_restore = fetch_checkpoint(str(restore), rank=self.rank) if restore is not None else None
        self._setup_model(local_restore)
        self._setup_data()
        self.engine: Engine = build_engine(
            self.plan.strategy, self.model, self._make_optimizer, self.spec.hyperparameters.maxGradNorm, self.device,
            self.spec.compute.precisionType, deepspeed_config=self.plan.deepspeed, fsdp=self.plan.fsdp,
            units=shard_units(self.model, self.arch.language_model_prefix, self.arch.vision_modules)
            if self.plan.strategy.startswith("fsdp2") else None,
            materialize=lambda model: materialize_sharded(model, self.weights_path, self.device, self.spec.seed),
        )
        self._setup_lr_scheduler()
        if local_restore is not None:
            self._restore(local_restore)
        self.checkpoints.begin_attempt()  # an interrupted attempt's partial uploads go now, while the store answers

    def _setup_model(self, restore: Path | None) -> None:
        self.model_path = resolve_source(self.spec.model.source or self.arch.repo_id, self.spec.model.revision)
        self.processor = load_processor(self.model_path, self.spec.media, arch=self.arch)
        full = self.spec.trainingMode.type == "Full"
        # Full fine-tuning resumes from the checkpoint's own weights when they are in Hugging Face form (ddp); the
        # sharded engines restore theirs in `Engine.load`, as LoRA loads its adapter onto the base later.
        in_hf_form = restore is not None and (restore / "config.json").exists()
        self.weights_path = restore if (full and in_hf_form) else self.model_path
        # The GPU kernels this worker runs (flash-attention, Liger, grouped experts, compile); none on the CPU.
        self.kernels = kernels.choose(self.arch, self.device, self.spec.compute.precisionType,
                                      self.spec.compute.compile, self.plan.strategy)
        model, self.autocast_dtype = prepare_for_training(
            self.weights_path, self.arch, self.spec.trainingMode.type, self.spec.compute.precisionType,
            self.spec.quantization, self.spec.lora, self.device, self.plan.gradient_checkpointing,
            train_vision=self.spec.full.trainVision, strategy=self.plan.strategy,
            deepspeed_config=self.plan.deepspeed, checkpoint_every=self.plan.checkpoint_every, kernels=self.kernels,
        )
        model.train()
        self.model = model
        self.pack_tokens = pack_budget(self.spec, self.plan)
        self.pack_strict = self.spec.data.packTokens is not None  # the user's budget: a longer sample is an error
        if self.pack_tokens:
            prepare_for_packing(model)
            self.positions = sample_positions(model)
        self.trainable, self.total_params = trainable_parameters(model)
        kernels.report(self.kernels, self.metrics_log.write)  # metrics.jsonl, and each missing kernel on stderr
        self.loss_head = LossHead.install(model, self.device)  # the LM head at the answer positions only

    def _make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        hp, full = self.spec.hyperparameters, self.spec.full
        groups = parameter_groups(model, self.arch, hp.learningRate, full.visionLearningRate, full.projectorLearningRate)
        return build_optimizer(hp.optimizer, groups, hp.learningRate, hp.weightDecay, self.device)

    def _setup_lr_scheduler(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        warmup = int(self.total_steps * self.spec.hyperparameters.warmupRatio)
        self.engine.attach_scheduler(lambda opt: get_cosine_schedule_with_warmup(opt, warmup, self.total_steps))

    def _setup_data(self) -> None:
        self.collator_factory = CollatorFactory.of(self.spec)
        self.collator = self.collator_factory()
        self.data = self.config.data(self.rank, self.world_size)
        self.order = self.data.order
        self.steps_per_epoch = self.order.steps_per_epoch
        self.total_steps = self.data.total_steps
        self.evaluates = bool(self.data.eval_filler)  # every rank evaluates when there is held-out data
        self.generation = GenerationSettings.from_evaluation(self.spec.evaluation)
        # On GPUs a Ray Data actor pool preprocesses beside the worker; on CPU workers the cores are the training,
        # so a thread inside the worker does it (no second process competing for the same cores).
        actors = self.spec.data.preprocessors
        if actors is None:
            actors = 1 if self.plan.device == "gpu" else 0
        self.stream = SampleStream(self.data.train, self.order, self.collator_factory,
                                   use_ray=in_ray_train_worker() and actors > 0, actors=max(1, actors))

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run every remaining step; evaluate and checkpoint at the interval. Returns the last metrics."""
        try:
            last = self._train()
        except BaseException:
            with contextlib.suppress(Exception):  # the records queued before the failure, without hiding it
                if self._pending is not None:  # the last step's record, not yet written
                    self.metrics_log.write(self._pending.resolve())
            with contextlib.suppress(Exception):
                self.metrics_log.close()
            raise
        self.metrics_log.close()  # every queued record written
        return last

    def _train(self) -> dict[str, Any]:
        epochs = self.spec.hyperparameters.epochs
        self.metrics_log.write({"event": "start", "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                                "epochs": epochs, "workers": self.world_size, "strategy": self.engine.name,
                                "trainable_params": self.trainable, "total_params": self.total_params,
                                "resumed_at": self.step})
        self.metrics_log.write(self.loss_head.event())  # which loss the steps run (label-only, or why not)
        if self.step == 0 and self.evaluates:
            self.metrics_log.write({"step": 0, "epoch": 0, **self.validate()})
        started, steps_done = time.time(), 0
        last: dict[str, Any] = {}
        batches = self.stream.steps(self.step, self.total_steps)
        while self.step < self.total_steps:
            micro_batches = next(batches)
            self._note_skips(micro_batches)
            loss = self._train_step(micro_batches)
            if self._pending is not None:  # the previous step's record: its copies are done by now
                self.metrics_log.write(self._pending.resolve())
                self._pending = None
            self.step += 1
            steps_done += 1
            elapsed = time.time() - started
            rate = steps_done * self.plan.effective_batch / max(elapsed, 1e-9)
            last = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss,
                    "lr": self.engine.scheduler.get_last_lr()[0], "samples_per_s": rate,
                    "eta_s": (self.total_steps - self.step) * elapsed / steps_done,
                    "data_wait_s": self.stream.step_wait,
                    "data_wait_share": self.stream.wait_seconds / max(elapsed, 1e-9),
                    **self.order.position(self.step).to_dict()}
            if self.device.type == "cuda":
                last["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            record = StepRecord(last)
            if record.ready_now or self._at_checkpoint():
                last = record.resolve()
                self.metrics_log.write(last)
            else:
                self._pending = record
            if self._at_checkpoint():
                evaluation = self.validate() if self.evaluates else {}
                skipped = self._report_skips()  # the training stand-ins and held-out skips since the last checkpoint
                if evaluation:
                    self.metrics_log.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, **evaluation})
                checkpoint = self.save_checkpoint({**last, **evaluation})
                self.reporter.report({**last, **evaluation}, checkpoint)
                if skipped and not self.config.skip_invalid:
                    self.checkpoints.wait()  # the checkpoint complete (uploaded) before the run stops
                    barrier()
                    raise self._bad_samples_error(skipped)
            notice = self.reporter.preempted()  # every rank, once a step: the same answer everywhere
            if notice is not None and self.step < self.total_steps:
                self._checkpoint_for_preemption(notice, last)
                return last  # no final/: the restarted group continues from this step
        self.save_final()
        return last

    def _checkpoint_for_preemption(self, notice: dict[str, Any], last: dict[str, Any]) -> None:
        """A node of the run goes away: the step just finished is checkpointed (unless the interval just did it), the
        checkpoint's uploads are waited for, and the notice is logged. The caller stops training; the restart resumes
        from this step and data position."""
        if self._pending is not None:
            last = self._pending.resolve()
            self.metrics_log.write(last)
            self._pending = None
        rel = f"checkpoints/step-{self.step}"
        if not self._at_checkpoint():
            self._report_skips()  # the stand-ins since the last checkpoint, in the report (every rank: a collective)
            self.reporter.report(last, self.save_checkpoint(last))
        self.checkpoints.wait()  # complete (marker last) before the deadline, also in an object store
        self.metrics_log.write({"event": "preemption", "step": self.step, "checkpoint": rel, **notice,
                                **self.order.position(self.step).to_dict()})
        self.metrics_log.flush()

    # ---- samples that stopped decoding after the data check -------------------------------------
    def _note_skips(self, micro_batches: list[list[Encoded]]) -> None:
        """Record the stand-ins of this step's micro-batches (`vray.data.pipeline.encode_or_stand_in`): samples
        whose image or video no longer decodes. They train as the vision dummy (no loss, zero gradient), so every
        rank still runs the same steps and micro-batches; the next checkpoint reports them."""
        import sys

        for encoded in micro_batches:
            for e in encoded:
                if e.skipped is not None:
                    self._skips.append({**e.skipped, "step": self.step + 1, "rank": self.rank})
                    print(f"vray: step {self.step + 1}, rank {self.rank}: skipped {e.skipped['error']}",
                          file=sys.stderr, flush=True)

    def _report_skips(self) -> list[dict[str, Any]]:
        """Every rank's stand-ins since the last checkpoint (one all-gather, at the checkpoint every rank reaches
        alike), oldest first. Rank 0 logs them (a `skipped_samples` event in metrics.jsonl) and rewrites the run's
        data report, data_report.json, at every checkpoint: each skipped sample once, with its file, error and the
        steps it was skipped in, and the step the report goes through."""
        import json

        gathered = all_gather_names([json.dumps(s, sort_keys=True) for s in self._skips])
        self._skips = []
        found = sorted((json.loads(s) for names in gathered for s in names), key=lambda s: (s["step"], s["rank"]))
        if self.rank != 0:
            return found
        for skip in found:
            split = skip.get("split", "train")
            entry = self._skipped.setdefault(f"{split}/{skip['id']}", {"id": skip["id"], "split": split,
                                                                      **{k: skip[k] for k in ("file", "kind", "error")}})
            entry.setdefault("steps", []).append(skip["step"])
        if found:
            self.metrics_log.write({"event": "skipped_samples", "step": self.step, "skipped": len(found),
                                    "skipped_rows": len(self._skipped),
                                    "samples": [{"split": s.get("split", "train"),
                                                 **{k: s[k] for k in ("id", "file", "kind", "step")}} for s in found]})
        self._write_data_report()  # at every checkpoint: `through_step` says how far the report goes
        return found

    def _write_data_report(self) -> None:
        import json

        rows = sorted(self._skipped.values(), key=lambda r: (r["steps"][0], r["id"]))
        text = json.dumps({"skipped_rows": len(rows), "skips": sum(len(r["steps"]) for r in rows),
                           "skip_invalid": self.config.skip_invalid, "through_step": self.step, "rows": rows},
                          indent=2) + "\n"
        # with the checkpoint it goes through: on a remote run, on the uploader thread (no step waits for the store)
        self.checkpoints.then(lambda: self.run.write_text(DATA_REPORT, text))

    def _restore_data_report(self) -> None:
        """Rank 0 of a resumed run: the report's skips up to the restored step (the steps after it are redone)."""
        import json

        if self.rank != 0 or not self.run.exists(DATA_REPORT):
            return
        try:
            rows = json.loads(self.run.read_text(DATA_REPORT)).get("rows", [])
        except (OSError, ValueError):
            return
        for row in rows:
            steps = [s for s in row.get("steps", []) if s <= self.step]
            if steps:
                split = row.get("split", "train")
                self._skipped[f"{split}/{row['id']}"] = {**row, "split": split, "steps": steps}

    def _bad_samples_error(self, skipped: list[dict[str, Any]]) -> VrayError:
        first = skipped[0]
        more = f" (and {len(skipped) - 1} more skip(s), listed in {DATA_REPORT})" if len(skipped) > 1 else ""
        which = "held-out sample" if first.get("split") == "eval" else "sample"
        return VrayError(
            f"{which} '{first['id']}' (file {first['file']!r}) no longer decodes since the data check: {first['error']}"
            f"{more}; the run stopped at its complete checkpoint step-{self.step}. Fix or restore the file (or remove "
            f"the row) and continue with `vray train --resume {self.run.uri}`, or train with --skip-invalid to skip "
            f"and report such samples")

    def _at_checkpoint(self) -> bool:
        every = self.spec.checkpointing.everySteps
        at_interval = self.step % every == 0 if every else self.step % self.steps_per_epoch == 0
        return at_interval or self.step == self.total_steps

    def _train_step(self, micro_batches: list[list[Encoded]]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches. Its gradient is that of the mean over every answer
        token of the step, on every rank (`vray.train.loss`); the step's micro-batches are collated first so the
        token count (one all-reduce) is known before the first backward. Returns that token mean (the logged loss), on
        the device: nothing in the step waits for the GPU (pinned, non-blocking copies; sums kept on the device).
        A sparse-MoE model under full fine-tuning adds its router's load-balancing loss, averaged over the step's
        micro-batches and ranks, times its coefficient."""
        batches, real = self._micro_batches(micro_batches)
        counted = torch.tensor([float(sum(answer_tokens(b["labels"]) for b in batches)), float(real)],
                               dtype=torch.float64)
        totals = all_reduce_sum_(to_device(counted, self.device))
        total = totals[0].clamp_min(1.0)
        tokens = total.float()  # exact up to 2^24 answer tokens a step
        micro_total = totals[1].clamp_min(1.0).float()  # the real micro-batches of every rank
        coef = self._router_aux_coef
        extra = {"output_router_logits": True} if coef else {}
        summed = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            labels = to_device(batch.pop("labels"), self.device)
            inputs = {k: to_device(v, self.device) for k, v in batch.items()}
            with self.engine.no_sync(last_micro_batch=i == len(batches) - 1):
                with self._autocast():
                    out, loss_sum = self.loss_head.run(self.engine.module, {**inputs, **extra, "use_cache": False},
                                                       labels)
                loss = loss_sum / tokens
                if coef:  # a filler micro-batch (i >= real) adds nothing
                    loss = loss + coef * out.aux_loss.float() * float(i < real) / micro_total
                self.engine.backward(loss)
            summed += loss_sum.detach().double()
        self.engine.step()
        return all_reduce_sum_(summed) / total

    def _micro_batches(self, micro_batches: list[list[Encoded]]) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The step's collated micro-batches, and how many of them hold samples. Padded: the stream's micro-batches
        as they are. Packed (`pack_budget`): the rank's samples of the step, in order, greedily packed into rows of
        at most `pack_tokens` tokens; every rank then runs as many micro-batches as the rank with the most (one
        all-reduce), the others adding fillers (the vision dummy, every label ignored: no loss, zero gradient), so
        the engines' accumulation and gradient synchronisation stay matched."""
        if not self.pack_tokens:
            batches = [self.collator.batch(self.collator.with_vision(encoded)) for encoded in micro_batches]
            return batches, len(batches)
        samples = [e for encoded in micro_batches for e in encoded]
        groups = pack_in_order([e.length for e in samples], self.pack_tokens, [e.has_visual for e in samples],
                               extra=self.collator.vision_dummy().length, names=[e.sample_id for e in samples],
                               strict=self.pack_strict)
        batches = [self.collator.pack(self.collator.with_vision([samples[i] for i in g]), self.positions)
                   for g in groups]
        rounds = all_reduce_max(len(batches), self.device)
        batches += [self.collator.pack([self.collator.vision_dummy()], self.positions)
                    for _ in range(rounds - len(batches))]
        return batches, len(groups)

    @functools.cached_property
    def _router_aux_coef(self) -> float:
        return router_aux_coef(self.spec, self.model.config)

    def _autocast(self) -> Any:
        """bf16 / fp16 compute over fp32 master weights (full fine-tuning, and LoRA's adapters); nothing in fp32 runs
        or where DeepSpeed casts the LoRA model itself."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ---- evaluation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Held-out loss and the task's metrics over the first `evaluation.maxSamples` held-out samples, summed
        exactly over every rank's share, generated `evaluation.batchSize` samples at a time.

        Generation runs here, on the training thread, with the step's weights: under zero3 and fsdp2 it is a
        collective (layers gathered, or the whole model gathered once), and a second thread issuing collectives
        would interleave with the training's on the same process group. Scoring (parsing answers, matching boxes)
        runs on a scorer thread while the next batch generates, and the one all-reduce of the sums comes after the
        last batch, on every rank alike. Rank 0's writes of the result go through the metrics log's writer thread.

        Every forward runs on the unwrapped model (a DDP forward takes part in a collective, which a rank without
        held-out samples would never join). Sharded engines gather the whole model once where it fits in memory
        (every forward is then local: ranks may run different numbers of batches, with or without images);
        otherwise every forward gathers each layer, so every rank runs as many batches as the others, padding with
        a copy of a held-out sample that is never scored."""
        from concurrent.futures import Future, ThreadPoolExecutor

        mine = self.data.eval[:self._eval_share()]
        batch_size = self.spec.evaluation.batchSize or max(1, self.plan.micro_batch)
        batches = [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]
        sums: dict[str, list[float]] = {"loss": [0.0, 0.0]}
        scored: list[Future[dict[str, tuple[float, float]]]] = []
        started = time.time()
        with evaluating(self.engine.model), self._autocast(), self.engine.generation(self._gather_for_eval()) as run, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="vray-eval-score") as scorer:
            settings = self.generation
            if run.synced:
                from dataclasses import replace

                settings = replace(settings, synced=True)
                self._check_lockstep_media(batches)
                rounds = all_reduce_max(len(batches), self.device)
                batches += [self.data.eval_filler] * (rounds - len(batches))
            seen = 0
            for samples in batches:
                real = max(0, min(len(samples), len(mine) - seen))  # the rest are filler copies, never scored
                seen += len(samples)
                samples, encoded, real = self._encode_held_out(samples, real)
                if not samples and not run.synced:
                    continue
                if not samples:  # a lockstep forward needs a batch: a filler copy, never scored
                    samples, encoded, real = self._encode_held_out(list(self.data.eval_filler), 0)
                    if not samples:
                        raise VrayError(f"evaluation at step {self.step}: no held-out sample of rank {self.rank}'s "
                                        "batch decodes any more, nor the filler copy the lockstep evaluation needs; "
                                        "fix or restore the held-out files and resume with `vray train --resume "
                                        f"{self.run.uri}`")
                batch = {k: v.to(self.device) for k, v in self.collator.batch(encoded).items()}
                labels = batch.pop("labels")
                with torch.no_grad():  # the label-only loss here too: no full-vocabulary logits in evaluation
                    _, loss_sum = self.loss_head.run(run.model, {**batch, "use_cache": False}, labels)
                loss = float(loss_sum) / max(1, answer_tokens(labels))
                prompts = [self.collator.encode(s, with_answer=False) for s in samples]
                texts, _ = generate_texts(run.model, self.processor.tokenizer,
                                          self.collator.batch(prompts, left_pad=True), settings)
                if real:
                    scored.append(scorer.submit(self._score, samples[:real], prompts[:real], texts[:real]))
                    sums["loss"][0] += loss * real
                    sums["loss"][1] += real
            for future in scored:
                for name, (n, d) in future.result().items():
                    acc = sums.setdefault(name, [0.0, 0.0])
                    acc[0] += n
                    acc[1] += d
        names = sorted(set().union(*all_gather_names(sorted(sums))))
        flat = all_reduce_sum([v for k in names for v in sums.get(k, [0.0, 0.0])], self.device)
        totals = {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(names)}
        out = {f"eval/{k}": n / max(d, 1e-9) for k, (n, d) in totals.items()}
        out["eval/samples"] = totals["loss"][1]
        # How the evaluation ran: its wall time, and whether the sharded weights were gathered once for it.
        out.update(eval_seconds=time.time() - started, eval_gathers=run.gathers, eval_synced=int(run.synced))
        return out

    def _encode_held_out(self, samples: list[Any], real: int) -> tuple[list[Any], list[Encoded], int]:
        """The samples of an evaluation batch that still encode, their encodings, and how many of them are real (the
        first `real` of `samples` are; the rest are filler copies). A held-out sample whose image or video no longer
        decodes since the data check is left out of the evaluation (its loss and metrics) and noted as a training
        stand-in is: the next checkpoint reports it, and without --skip-invalid stops the run."""
        import sys

        kept, encoded, kept_real = [], [], 0
        for i, sample in enumerate(samples):
            try:
                enc = self.collator.encode(sample)
            except DataError as exc:
                if i < real:
                    self._skips.append({**skip_record(sample, exc), "split": "eval", "step": self.step,
                                        "rank": self.rank})
                    print(f"vray: evaluation at step {self.step}, rank {self.rank}: skipped {exc}", file=sys.stderr,
                          flush=True)
                continue
            kept.append(sample)
            encoded.append(enc)
            kept_real += i < real
        return kept, encoded, kept_real

    def _score(self, samples: list[Any], prompts: list[Encoded], texts: list[str]) -> dict[str, tuple[float, float]]:
        """The task's metric sums (numerator, denominator) over one generated batch (on the scorer thread)."""
        out: dict[str, tuple[float, float]] = {}
        for sample, enc, text in zip(samples, prompts, texts):
            for name, (n, d) in task_metrics.score_sample(self.task, text, sample, enc.reference, enc.geometries,
                                                          self.arch.box_convention).items():
                acc = out.get(name, (0.0, 0.0))
                out[name] = (acc[0] + n, acc[1] + d)
        return out

    def _eval_share(self) -> int:
        """How many of this rank's held-out samples are among the first `evaluation.maxSamples` (rank r holds the
        samples r, r + world, ...)."""
        cap = self.spec.evaluation.maxSamples
        if cap is None:
            return len(self.data.eval)
        return min(len(self.data.eval), len(range(self.rank, cap, self.world_size)))

    def _gather_for_eval(self) -> bool:
        """Whether a sharded engine gathers the whole model for evaluation: on CPU plans always; on a GPU when the
        model at the compute dtype (the plan's parameter count) fits in the free memory with room to generate."""
        if not self.engine.lockstep_generation or self.world_size == 1:
            return False  # replicated weights: nothing to gather
        if self.device.type != "cuda":
            return True
        params = (self.plan.assumptions.get("params") or {}).get("total")
        if not params:
            params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.model.parameters())
        itemsize = torch.empty((), dtype=DTYPES[self.spec.compute.precisionType]).element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        return all_reduce_min(int(gather_fits(int(params) * itemsize, free)), self.device) == 1

    def _check_lockstep_media(self, batches: list[list[Any]]) -> None:
        """Ranks that gather each layer in every forward must all run the vision tower or all skip it: refuse held-out
        data that mixes samples with and without images (or videos) there, before any rank waits on a gather that
        the others skip."""
        samples = [s for b in batches for s in b] + list(self.data.eval_filler)
        counts = [float(sum(bool(getattr(s, kind)) for s in samples)) for kind in ("images", "videos")]
        totals = all_reduce_sum([*counts, float(len(samples))], self.device)
        for kind, having in zip(("images", "videos"), totals[:2]):
            if 0 < having < totals[2]:
                raise VrayError(
                    f"evaluation: the held-out data mixes samples with and without {kind}, and under "
                    f"{self.engine.name} the whole model does not fit in GPU memory to evaluate them; give data.eval "
                    f"samples that all have {kind} or none do, or a plan whose GPUs hold the model at the compute dtype")

    # ---- checkpoints ---------------------------------------------------------------------------
    def _info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "data_position": self.order.position(self.step).to_dict(),
            "kind": "lora" if self.spec.trainingMode.type == "LoRA" else "full",
            "strategy": self.engine.name,
            "world_size": self.world_size,
            "architecture": self.arch.key,
            "model_type": self.arch.model_type,
            "base_model": self.spec.model.source,
            "task": self.task,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }

    def _write(self, rel: str, info: dict[str, Any], final: bool = False) -> str:
        """Every rank saves through the engine and its own random state; rank 0 adds the training state. The marker
        says whether the folder has Hugging Face weights (`weights`: adapter, model or none); published last."""
        def save(staged: Path) -> None:
            self.engine.save(staged, self.processor, final=final)
            if not final:
                torch.save(_rng_state(), staged / RNG_STATE.format(rank=self.rank))
            if self.rank == 0:
                if not final:
                    torch.save({"scheduler": self.engine.scheduler.state_dict(), "step": self.step,
                                "best_metric": self.best_metric}, staged / TRAINING_STATE)
                info["weights"] = ("adapter" if (staged / "adapter_config.json").exists()
                                   else "model" if (staged / "config.json").exists() else None)

        return self.checkpoints.write(rel, save, info)

    def save_checkpoint(self, metrics: dict[str, Any]) -> str:
        """checkpoints/step-N, visible only when complete; `best` moves when the metric improved; older checkpoints
        beyond the latest and the best N are removed."""
        value = metrics.get(f"eval/{self.primary}")
        improved = value is not None and (self.best_metric is None or value > self.best_metric)
        if improved:
            self.best_metric = value
        rel = f"checkpoints/step-{self.step}"
        path = self._write(rel, self._info(metrics))
        if self.rank == 0:
            def bookkeeping() -> None:  # once the checkpoint is complete: `best` never points at a partial one
                if improved or self.run.best_checkpoint() is None:
                    self.run.point_best_at(rel)
                self.checkpoints.retain(f"eval/{self.primary}", self.spec.checkpointing.keepBest)
            self.checkpoints.then(bookkeeping)  # on a remote run, off the training thread: an outage stalls no step
            self.metrics_log.flush()
        barrier()
        return path

    def save_final(self) -> None:
        """final/: the trained weights (adapter or full) in Hugging Face format, with the processor; waits until
        every upload of the run's checkpoints has finished, then keeps the latest and the best N of them."""
        self._write("final", self._info({}), final=True)
        self.checkpoints.wait()
        if self.rank == 0:  # a checkpoint that was still uploading at its own retention counts now
            self.checkpoints.retain(f"eval/{self.primary}", self.spec.checkpointing.keepBest)

    def _restore(self, folder: Path) -> None:
        """Weights, optimizer, scheduler, step, data position, best metric and this rank's RNG from a checkpoint.
        Written at another world size: the engine reshards what it can (or says why not); a rank the checkpoint had
        no random state for starts its own stream from the seed, the step and its rank."""
        info = read_checkpoint_info(folder)
        saved_world = info.get("world_size")
        self.engine.load(folder, saved_world)
        saved = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
        self.engine.scheduler.load_state_dict(saved["scheduler"])
        self.step = int(saved["step"])
        self.best_metric = saved.get("best_metric")
        mine = folder / RNG_STATE.format(rank=self.rank)
        if mine.exists():  # dropout continues with the same random stream, rank by rank
            _set_rng_state(torch.load(mine, map_location="cpu", weights_only=False), self.device)
        elif "rng" in saved:  # a checkpoint from before per-rank states: rank 0's CPU stream
            torch.set_rng_state(saved["rng"])
        else:
            _seed_everything(self.spec.seed + 1_000_003 * self.step + self.rank)
        redone = self.metrics_log.truncate_after(self.step)
        self._restore_data_report()
        # redone_steps: the steps an interrupted attempt had logged past this checkpoint, which this one trains again
        # (on a remote run directory, as far as its log had gone up: the last upload interval may be missing)
        self.metrics_log.write({"event": "restored", "step": self.step, "from": str(folder), "redone_steps": redone,
                                "saved_world_size": saved_world, **self.order.position(self.step).to_dict()})


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: to a GPU through pinned memory without blocking (the copy is queued behind the
    running kernels; the host waits for nothing); to the CPU as it is."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _rng_state() -> dict[str, Any]:
    """This process's random streams: torch CPU and CUDA (this rank's device), Python and NumPy."""
    import numpy as np

    state: dict[str, Any] = {"cpu": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def train_worker(config: WorkerConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Entry point of one worker: set up and train. Runs in Ray Train or a plain process."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    recipe = Recipe(config, reporter or LocalReporter(Path(config.resume_from) if config.resume_from else None))
    # which process is which rank: for operators (and the failure tests, the chaos benchmark) to find a worker
    recipe.run.write_text(f".workers/rank-{recipe.rank}.pid", f"{os.getpid()}\n")
    recipe.setup()
    return recipe.train()
