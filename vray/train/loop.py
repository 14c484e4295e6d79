"""The per-worker training recipe: one loop, read top to bottom; strategy specifics live in the engines.

`Recipe(config, reporter).setup()` builds model, optimizer, scheduler and data in that order; `train()`
runs the epochs with evaluation and checkpoints beside it. It runs under Ray Train (the TorchTrainer's
`train_func`) or in a plain process, with or without a torch.distributed process group.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from vray.archs import registry
from vray.data.boxes import PixelBox
from vray.data.collate import Collator, Encoded
from vray.data.io import read_samples
from vray.data.pipeline import DataOrder, SampleStream
from vray.data.sample import Sample
from vray.models.generate import GenerationSettings, generate_texts
from vray.models.loader import load_processor, prepare_for_training, resolve_source, trainable_parameters
from vray.plan.plan import Plan
from vray.spec import RunSpec
from vray.train import metrics as task_metrics
from vray.train.engines import Engine, all_reduce_sum, barrier, build_engine, evaluating, world
from vray.rundir import CHECKPOINT_MARKER, RunDir, read_checkpoint_info

TRAINING_STATE = "training_state.pt"


class Reporter(Protocol):
    """Where a worker reports metrics and checkpoints (Ray Train, or nothing in a plain process)."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None: ...

    def restore_from(self) -> Path | None: ...


class LocalReporter:
    """A plain process: checkpoints are already in the run directory; resume from `resume_from` if given."""

    def __init__(self, resume_from: Path | None = None):
        self.resume_from = resume_from

    def report(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        return None

    def restore_from(self) -> Path | None:
        return self.resume_from


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    spec: dict[str, Any]
    plan: dict[str, Any]
    run_dir: str
    train_path: str
    eval_path: str | None
    resume_from: str | None = None
    eval_limit: int | None = None
    exclude_ids: tuple[str, ...] = ()  # rows the driver's check refused (--skip-invalid)
    skip_invalid: bool = False  # rows that do not even parse were reported by the driver and are left out
    max_tokens: int | None = None  # the token budget of a sample

    def to_dict(self) -> dict[str, Any]:
        """For Ray's train_loop_config."""
        return dict(self.__dict__)


def _in_ray_worker() -> bool:
    try:
        import ray
        import ray.train

        return ray.is_initialized() and ray.train.get_context() is not None
    except Exception:  # noqa: BLE001 - no Ray, or not inside a Ray Train worker
        return False


def _dataset_rows(split: str) -> list[dict[str, Any]] | None:
    """The rows Ray Train hands this worker for a split, or None outside Ray Train."""
    if not _in_ray_worker():
        return None
    import ray.train

    try:
        shard = ray.train.get_dataset_shard(split)
    except Exception:  # noqa: BLE001 - the run was started without datasets
        return None
    if shard is None:
        return None
    return [json.loads(row["sample_json"]) for row in shard.iter_rows()]


@dataclass(frozen=True)
class CollatorFactory:
    """Builds the run's collator wherever preprocessing runs (a training worker or a Ray Data actor)."""

    source: str
    revision: str | None
    architecture: str
    system_prompt: str | None
    media: dict[str, Any]
    max_tokens: int | None

    def __call__(self) -> Collator:
        from vray.models.loader import resolve_processor_source
        from vray.spec import MediaBlock

        arch = registry.get(*self.architecture.split(":", 1))
        media = MediaBlock(**self.media)
        processor = load_processor(resolve_processor_source(self.source, self.revision), media)
        return Collator(processor, arch, self.system_prompt, max_tokens=self.max_tokens, max_frames=media.maxFrames)


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


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
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
        self.spec = RunSpec.model_validate(config.spec)
        self.plan = Plan.from_dict(config.plan)
        self.arch = registry.get(self.spec.architecture.name, self.spec.architecture.size)
        self.run = RunDir.of(config.run_dir)
        self.rank, self.world_size = world()
        self.device = _device(self.plan)
        self.task = self.spec.effective_task or "vqa"
        self.primary = task_metrics.PRIMARY_METRIC[self.task]
        self.step = 0
        self.best_metric: float | None = None
        self.history: list[dict[str, Any]] = []

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Model, optimizer, scheduler and data, in that order; then restore a checkpoint if there is one."""
        torch.manual_seed(self.spec.seed)
        random.seed(self.spec.seed)
        restore = self.reporter.restore_from()
        self._setup_model(Path(restore) if restore is not None else None)
        self._setup_data()
        self._setup_optimizer()
        self._setup_lr_scheduler()
        self.engine: Engine = build_engine(
            self.plan.strategy, self.model, self.optimizer, self.scheduler,
            self.spec.hyperparameters.maxGradNorm, self.device,
        )
        if restore is not None:
            self._restore(Path(restore))

    def _setup_model(self, restore: Path | None) -> None:
        self.model_path = resolve_source(self.spec.model.source or self.arch.repo_id, self.spec.model.revision)
        self.processor = load_processor(self.model_path, self.spec.media)
        full = self.spec.trainingMode.type == "Full"
        # Full fine-tuning resumes from the checkpoint's own weights; LoRA loads its adapter onto the base later.
        weights = restore if (full and restore is not None) else self.model_path
        model, self.autocast_dtype = prepare_for_training(
            weights, self.arch, self.spec.trainingMode.type, self.spec.compute.precisionType,
            self.spec.quantization.model_dump(), self.spec.lora, self.device, self.plan.gradient_checkpointing,
        )
        model.train()
        self.model = model
        self.trainable, self.total_params = trainable_parameters(model)

    def _setup_optimizer(self) -> None:
        hp = self.spec.hyperparameters
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(hp.optimizer, params, hp.learningRate, hp.weightDecay, self.device)

    def _setup_lr_scheduler(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        warmup = int(self.total_steps * self.spec.hyperparameters.warmupRatio)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    def _setup_data(self) -> None:
        self.collator = self.collator_factory()
        self.train_samples = self._samples("train", self.config.train_path)
        self.eval_samples: list[Sample] = self._samples("eval", self.config.eval_path) if self.config.eval_path else []
        if self.config.eval_limit:
            self.eval_samples = self.eval_samples[: self.config.eval_limit]
        self.order = DataOrder(len(self.train_samples), self.plan.effective_batch, self.plan.micro_batch,
                               self.spec.seed, self.rank, self.world_size)
        self.steps_per_epoch = self.order.steps_per_epoch
        self.total_steps = self.steps_per_epoch * self.spec.hyperparameters.epochs
        self.generation = GenerationSettings.from_evaluation(self.spec.evaluation)
        # On GPUs a Ray Data actor pool preprocesses beside the worker; on CPU workers the cores are the training,
        # so a thread inside the worker does it (no second process competing for the same cores).
        actors = self.spec.data.preprocessors
        if actors is None:
            actors = 1 if self.plan.device == "gpu" else 0
        self.stream = SampleStream(self.train_samples, self.order, self.collator_factory,
                                   use_ray=_in_ray_worker() and actors > 0, actors=max(1, actors))

    @property
    def collator_factory(self) -> CollatorFactory:
        return CollatorFactory(self.spec.model.source or self.arch.repo_id, self.spec.model.revision, self.arch.key,
                               self.spec.systemPrompt, self.spec.media.model_dump(), self.config.max_tokens)

    def _samples(self, split: str, path: str | None) -> list[Sample]:
        """The split's validated samples: from Ray Train's dataset shard, or read from the file."""
        exclude = set(self.config.exclude_ids)
        rows = _dataset_rows(split)
        if rows is not None:
            samples = [Sample.model_validate(r) for r in rows]
        else:
            result = read_samples(path, task=self.task)
            # With --skip-invalid the driver has checked the data and reported every row it leaves out.
            samples = result.samples if self.config.skip_invalid else result.samples_or_raise()
        return [s for s in samples if s.id not in exclude]

    # ---- the loop ------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run every remaining step; evaluate and checkpoint after each epoch. Returns the last metrics."""
        epochs = self.spec.hyperparameters.epochs
        self._log({"event": "start", "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                   "epochs": epochs, "workers": self.world_size, "trainable_params": self.trainable,
                   "total_params": self.total_params, "resumed_at": self.step})
        if self.step == 0 and self.eval_samples:
            self._log({"step": 0, "epoch": 0, **self.validate()})
        started, steps_done = time.time(), 0
        last: dict[str, Any] = {}
        batches = self.stream.steps(self.step, self.total_steps)
        while self.step < self.total_steps:
            loss = self._train_step(next(batches))
            self.step += 1
            steps_done += 1
            elapsed = time.time() - started
            rate = steps_done * self.plan.effective_batch / max(elapsed, 1e-9)
            last = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                    "eta_s": (self.total_steps - self.step) * elapsed / steps_done,
                    "data_wait_s": self.stream.step_wait,
                    "data_wait_share": self.stream.wait_seconds / max(elapsed, 1e-9),
                    **self.order.position(self.step).to_dict()}
            self._log(last)
            if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                evaluation = self.validate() if self.eval_samples else {}
                if evaluation:
                    self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **evaluation})
                checkpoint = self.save_checkpoint({**last, **evaluation})
                self.reporter.report({**last, **evaluation}, checkpoint)
        self.save_final()
        return last

    def _train_step(self, micro_batches: list[list[Encoded]]) -> float:
        total = 0.0
        for i, encoded in enumerate(micro_batches):
            batch = self.collator.batch(encoded)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.engine.no_sync(last_micro_batch=i == len(micro_batches) - 1):
                with self._autocast():
                    loss = self.engine.module(**batch).loss / len(micro_batches)
                self.engine.backward(loss)
            total += float(loss.detach())
        self.engine.step()
        return all_reduce_sum([total], self.device)[0] / self.world_size

    def _autocast(self) -> Any:
        """bf16 / fp16 compute over fp32 master weights (full fine-tuning); nothing otherwise."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ---- evaluation ----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        """Held-out loss and the task's primary metric, summed exactly over every rank's shard."""
        mine = self.eval_samples[self.rank::self.world_size]
        loss_sum, loss_n, num, den = 0.0, 0.0, 0.0, 0.0
        batch_size = max(1, self.plan.micro_batch)
        with evaluating(self.model), self._autocast():
            for j in range(0, len(mine), batch_size):
                samples = mine[j:j + batch_size]
                encoded = [self.collator.encode(s) for s in samples]
                batch = {k: v.to(self.device) for k, v in self.collator.batch(encoded).items()}
                loss_sum += float(self.model(**batch).loss) * len(samples)
                loss_n += len(samples)
                prompts = [self.collator.encode(s, with_answer=False) for s in samples]
                texts, _ = generate_texts(self.model, self.processor.tokenizer,
                                          self.collator.batch(prompts, left_pad=True), self.generation)
                for sample, enc, text in zip(samples, prompts, texts):
                    boxes = [PixelBox(b.label, b.bbox) for b in sample.answer.boxes]
                    geo = enc.geometries[sample.answer.boxes[0].image] if boxes else (enc.geometries[0] if enc.geometries else None)
                    n, d = task_metrics.score(self.task, text, enc.reference, boxes, self.arch.box_convention, geo)
                    num, den = num + n, den + d
        loss_sum, loss_n, num, den = all_reduce_sum([loss_sum, loss_n, num, den], self.device)
        return {"eval/loss": loss_sum / max(loss_n, 1), f"eval/{self.primary}": num / max(den, 1e-9),
                "eval/samples": loss_n}

    # ---- checkpoints ---------------------------------------------------------------------------
    def _info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "kind": "lora" if self.spec.trainingMode.type == "LoRA" else "full",
            "architecture": self.arch.key,
            "model_type": self.arch.model_type,
            "base_model": self.spec.model.source,
            "task": self.task,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }

    def _write_weights(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)

    def save_checkpoint(self, metrics: dict[str, Any]) -> Path:
        """Write checkpoints/step-N atomically (temp folder, then rename) and move `best` when it improved."""
        target = self.run.checkpoint(self.step)
        if self.engine.saves_on_this_rank():
            tmp = self.run.checkpoints / f".step-{self.step}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._write_weights(tmp)
            value = metrics.get(f"eval/{self.primary}")
            improved = value is not None and (self.best_metric is None or value > self.best_metric)
            if improved:
                self.best_metric = value
            torch.save({**self.engine.training_state(), "step": self.step, "best_metric": self.best_metric,
                        "rng": torch.get_rng_state()}, tmp / TRAINING_STATE)
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(self._info(metrics), indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            if improved or self.run.best_checkpoint() is None:
                self.run.point_best_at(target)
        barrier()
        return target

    def save_final(self) -> None:
        """final/: the trained weights (adapter or full) in Hugging Face format, with the processor."""
        if self.engine.saves_on_this_rank():
            tmp = self.run.root / f".final.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_weights(tmp)
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(self._info({}), indent=2) + "\n")
            shutil.rmtree(self.run.final, ignore_errors=True)
            os.replace(tmp, self.run.final)
        barrier()

    def _restore(self, folder: Path) -> None:
        """Adapter weights, optimizer, scheduler, step and best metric from a checkpoint."""
        from safetensors.torch import load_file

        info = read_checkpoint_info(folder)
        if info["kind"] == "lora":  # full weights were loaded from the checkpoint in _setup_model
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(folder / "adapter_model.safetensors")))
        saved = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
        self.engine.load_training_state(saved)
        self.step = int(saved["step"])
        self.best_metric = saved.get("best_metric")
        if "rng" in saved:  # dropout continues with the same random stream
            torch.set_rng_state(saved["rng"])

    # ---- logging -------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        """Rank 0 appends one line to metrics.jsonl (the driver renders progress from it)."""
        if self.rank != 0:
            return
        record = {"time": time.time(), **record}
        self.history.append(record)
        with open(self.run.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def train_worker(config: dict[str, Any], reporter: Reporter | None = None) -> dict[str, Any]:
    """Entry point of one worker: set up and train. Runs in Ray Train or a plain process."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = WorkerConfig(**config)
    recipe = Recipe(cfg, reporter or LocalReporter(Path(cfg.resume_from) if cfg.resume_from else None))
    recipe.setup()
    return recipe.train()
