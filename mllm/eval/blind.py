"""Image-blind baselines, fit on training data only: what the text of a question alone gets right.

    table = majority_answers(train_keys, train_answers)             # e.g. key = question template
    answers = predict_by_backoff([exact_table, template_table], [[q, t] for q, t in test_keys], default="yes")

    box, hits = best_constant_box(train_boxes)                      # the box that most training boxes overlap
    boxes = best_box_per_key(train_keys, train_boxes, min_count=20) # e.g. key = the position phrase

A model that "answers from the image" must beat these on the same test items (mllm.eval.stats.mcnemar); a model
that beats chance or the mean box only may have learnt the questions' wording. The best box for a set of training
boxes is searched among those boxes themselves (plus their mean and median): the candidate with the most training
boxes at IoU >= 0.5 (the Acc@0.5 criterion), which beats the mean box whenever the boxes are spread out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np

IOU_THRESHOLD = 0.5


def majority_answers(keys: Sequence[Hashable], answers: Sequence[str]) -> dict[Hashable, str]:
    """The most frequent training answer per key; ties go to the answer most frequent overall, then to the
    alphabetically first (deterministic)."""
    if len(keys) != len(answers):
        raise ValueError(
            f"majority_answers needs one answer per key, got {len(keys)} keys, {len(answers)} answers"
        )
    overall = Counter(answers)
    counts: dict[Hashable, Counter] = {}
    for key, answer in zip(keys, answers):
        counts.setdefault(key, Counter())[answer] += 1
    return {key: min(counter, key=lambda a: (-counter[a], -overall[a], a)) for key, counter in counts.items()}


def predict_by_backoff(tables: Sequence[dict], item_keys: Sequence[Sequence[Hashable]], default):
    """Per item, the value of the first table (most specific first) that knows the item's key for that table;
    `default` when none does. `item_keys[i][t]` is item i's key in `tables[t]`."""
    out = []
    for keys in item_keys:
        if len(keys) != len(tables):
            raise ValueError(f"each item needs one key per table ({len(tables)}), got {len(keys)}")
        value = next((table[key] for table, key in zip(tables, keys) if key in table), default)
        out.append(value)
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a [N, 4] with every box of b [M, 4] -> [N, M] (`[x0, y0, x1, y1]`, the same formula as
    `mllm.boxes.iou`: continuous coordinates, 0 for an empty union)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter_w = np.clip(
        np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None
    )
    inter_h = np.clip(
        np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None
    )
    inter = inter_w * inter_h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_constant_box(boxes: Sequence[Sequence[float]], chunk: int = 512) -> tuple[list[float], int]:
    """The one box that the most of `boxes` overlap at IoU >= 0.5, among the boxes themselves, their mean and their
    median; returns (box, how many of `boxes` it hits). Ties go to the first candidate."""
    targets = np.asarray(boxes, dtype=np.float64)
    if targets.ndim != 2 or targets.shape[1] != 4 or len(targets) == 0:
        raise ValueError(f"best_constant_box needs [N, 4] boxes with N >= 1, got shape {targets.shape}")
    candidates = np.concatenate(
        [targets.mean(0, keepdims=True), np.median(targets, 0, keepdims=True), targets]
    )
    hits = np.concatenate(
        [
            (iou_matrix(candidates[start : start + chunk], targets) >= IOU_THRESHOLD).sum(1)
            for start in range(0, len(candidates), chunk)
        ]
    )
    best = int(np.argmax(hits))
    return [float(v) for v in candidates[best]], int(hits[best])


def best_box_per_key(
    keys: Sequence[Hashable], boxes: Sequence[Sequence[float]], min_count: int = 1
) -> dict[Hashable, list[float]]:
    """`best_constant_box` of the training boxes of each key that has at least `min_count` of them."""
    if len(keys) != len(boxes):
        raise ValueError(f"best_box_per_key needs one box per key, got {len(keys)} keys, {len(boxes)} boxes")
    groups: dict[Hashable, list[Sequence[float]]] = {}
    for key, box in zip(keys, boxes):
        groups.setdefault(key, []).append(box)
    return {key: best_constant_box(group)[0] for key, group in groups.items() if len(group) >= min_count}
