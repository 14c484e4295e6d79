"""Task metrics: VQA exact match and ANLS; grounding precision, recall and mean IoU at IoU 0.5; freeform token F1.

Each metric is a (numerator, denominator) pair per sample, so the shards of every rank sum exactly.
Reasoning traces (`<think>...</think>`) are left out of every comparison.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from vray.data.boxes import ImageGeometry, PixelBox, iou, parse_answer
from vray.data.sample import Sample, final_answer

PRIMARY_METRIC = {"vqa": "exact_match", "phrase_grounding": "recall@0.5", "freeform": "token_f1"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
ANLS_THRESHOLD = 0.5


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual VQA / SQuAD normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, reference: str) -> float:
    """Average normalised Levenshtein similarity of one answer (0 below the 0.5 threshold), as DocVQA scores it."""
    p, r = " ".join(prediction.lower().split()), " ".join(reference.lower().split())
    if not p and not r:
        return 1.0
    similarity = 1 - _levenshtein(p, r) / max(len(p), len(r))
    return similarity if similarity >= ANLS_THRESHOLD else 0.0


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


def match_boxes(predicted: list[PixelBox], reference: list[PixelBox], threshold: float = 0.5) -> tuple[int, float]:
    """(reference boxes matched by a same-label prediction with IoU >= threshold, sum of each reference box's best
    same-label IoU); predictions match one-to-one."""
    used: set[int] = set()
    hits, iou_sum = 0, 0.0
    for ref in reference:
        best, best_iou, any_iou = None, threshold, 0.0
        for i, pred in enumerate(predicted):
            if normalize_answer(pred.label) != normalize_answer(ref.label):
                continue
            score = iou(pred.bbox, ref.bbox)
            any_iou = max(any_iou, score)
            if i not in used and score >= best_iou:
                best, best_iou = i, score
        iou_sum += any_iou
        if best is not None:
            used.add(best)
            hits += 1
    return hits, iou_sum


def box_recall(predicted: list[PixelBox], reference: list[PixelBox], threshold: float = 0.5) -> tuple[int, int]:
    """(reference boxes matched at IoU >= threshold, reference boxes)."""
    return match_boxes(predicted, reference, threshold)[0], len(reference)


def sample_scores(task: str, prediction: str, reference: str, reference_boxes: list[PixelBox], convention: str,
                  geometry: ImageGeometry | None) -> dict[str, tuple[float, float]]:
    """Every metric of the task for one sample, as (numerator, denominator)."""
    prediction, reference = final_answer(prediction), final_answer(reference)
    if task == "vqa":
        return {"exact_match": (exact_match(prediction, reference), 1.0), "anls": (anls(prediction, reference), 1.0)}
    if task == "freeform":
        return {"token_f1": (token_f1(prediction, reference), 1.0), "exact_match": (exact_match(prediction, reference), 1.0)}
    if geometry is None:
        raise ValueError("scoring a grounding answer needs the image geometry")
    predicted = parse_answer(prediction, convention, geometry)
    hits, iou_sum = match_boxes(predicted, reference_boxes)
    return {"recall@0.5": (float(hits), float(len(reference_boxes))),
            "precision@0.5": (float(hits), float(len(predicted))),
            "mean_iou": (iou_sum, float(len(reference_boxes)))}


def score(task: str, prediction: str, reference: str, reference_boxes: list[PixelBox],
          convention: str, geometry: ImageGeometry | None) -> tuple[float, float]:
    """(numerator, denominator) of the task's primary metric for one sample."""
    return sample_scores(task, prediction, reference, reference_boxes, convention, geometry)[PRIMARY_METRIC[task]]


def answer_geometry(sample: Sample, geometries: list[ImageGeometry]) -> ImageGeometry | None:
    """The geometry of the image a sample's answer boxes are on (its first image when the answer has none)."""
    boxes = sample.answer.boxes
    if boxes:
        return geometries[boxes[0].image]
    return geometries[0] if geometries else None


def score_sample(task: str, text: str, sample: Sample, reference: str, geometries: list[ImageGeometry],
                 convention: str) -> dict[str, tuple[float, float]]:
    """Every metric of the task for a generated answer to `sample` (its encoded reference answer and image
    geometries): what the in-training evaluation and `vray eval` both score."""
    refs = [PixelBox(b.label, b.bbox) for b in sample.answer.boxes]
    return sample_scores(task, text, reference, refs, convention, answer_geometry(sample, geometries))
