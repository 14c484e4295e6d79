"""Task metrics: VQA exact match, grounding recall at IoU 0.5, freeform token-overlap F1."""

from __future__ import annotations

import re
import string
from collections import Counter

from vray.data.boxes import ImageGeometry, PixelBox, iou, parse_answer
from vray.data.sample import final_answer

PRIMARY_METRIC = {"vqa": "exact_match", "phrase_grounding": "recall@0.5", "freeform": "token_f1"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual VQA / SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall between normalised texts."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def box_recall(predicted: list[PixelBox], reference: list[PixelBox], threshold: float = 0.5) -> tuple[int, int]:
    """(reference boxes matched by a same-label prediction with IoU >= threshold, reference boxes); one-to-one."""
    used: set[int] = set()
    hits = 0
    for ref in reference:
        best, best_iou = None, threshold
        for i, pred in enumerate(predicted):
            if i in used or normalize_answer(pred.label) != normalize_answer(ref.label):
                continue
            score = iou(pred.bbox, ref.bbox)
            if score >= best_iou:
                best, best_iou = i, score
        if best is not None:
            used.add(best)
            hits += 1
    return hits, len(reference)


def score(task: str, prediction: str, reference: str, reference_boxes: list[PixelBox],
          convention: str, geometry: ImageGeometry | None) -> tuple[float, float]:
    """(numerator, denominator) of the task's primary metric for one sample, so shards sum exactly.
    Reasoning traces (`<think>...</think>`) are left out of the comparison."""
    prediction, reference = final_answer(prediction), final_answer(reference)
    if task == "vqa":
        return exact_match(prediction, reference), 1.0
    if task == "freeform":
        return token_f1(prediction, reference), 1.0
    if geometry is None:
        raise ValueError("scoring a grounding answer needs the image geometry")
    hits, total = box_recall(parse_answer(prediction, convention, geometry), reference_boxes)
    return float(hits), float(total)
