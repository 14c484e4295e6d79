"""Score a run on any dataset next to its base model, and write batch predictions.

`evaluate_run` and `predict_run` load a run's checkpoint (or final weights) the way the server does, generate
with the run's evaluation settings and score with the task's metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vray.data import metrics as task_metrics
from vray.data.boxes import parse_answer
from vray.data.io import read_samples
from vray.data.sample import Sample
from vray.infer.target import ServeTarget, require_loadable, resolve_target
from vray.models.generate import GenerationSettings, generate_texts


@dataclass
class Prediction:
    """One sample's answer."""

    id: str
    prediction: str
    reference: str
    boxes: list[dict[str, Any]]
    scores: dict[str, tuple[float, float]]

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prediction": self.prediction, "reference": self.reference}
        if self.boxes:
            out["boxes"] = self.boxes
        return out


def base_target(target: ServeTarget) -> ServeTarget:
    """The model a run started from, with the run's prompt and generation settings (the baseline)."""
    return replace(target, adapter=None, weights=None, checkpoint="base", model_id=f"{target.model_id} (base)",
                   quantization=None, stored=None)


def predict(target: ServeTarget, samples: list[Sample], batch_size: int = 8, device: str | None = None,
            progress: Callable[[int], None] | None = None) -> list[Prediction]:
    """Generate an answer for every sample with the target's evaluation settings, and score it."""
    from vray.infer.engine import ModelEngine

    engine = ModelEngine(target, device=device)
    task = target.task or "vqa"
    settings = GenerationSettings.from_evaluation(target.evaluation)
    out: list[Prediction] = []
    for j in range(0, len(samples), batch_size):
        chunk = samples[j:j + batch_size]
        encoded = [engine.collator.encode(s, with_answer=False) for s in chunk]
        batch = engine.collator.batch(encoded, left_pad=True)
        with torch.no_grad():
            texts, _ = generate_texts(engine.model, engine.processor.tokenizer, batch, settings)
        for sample, enc, text in zip(chunk, encoded, texts):
            geo = task_metrics.answer_geometry(sample, enc.geometries)
            boxes = []
            if task == "phrase_grounding" and geo is not None:
                boxes = [{"label": b.label, "bbox": [round(c, 1) for c in b.bbox]}
                         for b in parse_answer(task_metrics.final_answer(text), engine.arch.box_convention, geo)]
            scores = task_metrics.score_sample(task, text, sample, enc.reference, enc.geometries, engine.arch.box_convention)
            out.append(Prediction(sample.id, text, enc.reference, boxes, scores))
        if progress is not None:
            progress(len(chunk))
    return out


def aggregate(predictions: list[Prediction]) -> dict[str, float]:
    """The dataset-level value of every metric (sums of numerators over sums of denominators)."""
    totals: dict[str, list[float]] = {}
    for p in predictions:
        for name, (n, d) in p.scores.items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += n
            acc[1] += d
    return {k: n / d if d else 0.0 for k, (n, d) in sorted(totals.items())}


def _samples(data: str, task: str | None, limit: int | None) -> list[Sample]:
    from vray.data import synthetic

    if data.startswith("synthetic:"):
        data = str(synthetic.split_paths(data)[1])  # the held-out split
    samples = read_samples(data, task=task).samples_or_raise()
    return samples[:limit] if limit else samples


def evaluate_run(run: str, data: str, baseline: bool = True, limit: int | None = None, batch_size: int = 8,
                 device: str | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The task's metrics of a run (and of its base model) on a dataset."""
    target = resolve_target(run)
    require_loadable(target, base=baseline)
    samples = _samples(data, target.task, limit)
    report: dict[str, Any] = {"run": run, "checkpoint": target.checkpoint, "task": target.task, "data": data,
                              "samples": len(samples), "primary_metric": task_metrics.PRIMARY_METRIC[target.task or "vqa"]}
    report["fine_tuned"] = aggregate(predict(target, samples, batch_size, device, progress))
    if baseline:
        report["base"] = aggregate(predict(base_target(target), samples, batch_size, device, progress))
    return report


def predict_run(run: str, data: str, out: str, limit: int | None = None, batch_size: int = 8,
                device: str | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Write one JSON line per sample (id, prediction, reference, and boxes in image pixels for grounding)."""
    target = resolve_target(run)
    require_loadable(target)
    predictions = predict(target, _samples(data, target.task, limit), batch_size, device, progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for p in predictions:
            fh.write(json.dumps(p.row()) + "\n")
    return len(predictions)

