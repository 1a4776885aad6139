"""Intervals, exact tests, pair accuracy (mllm/eval/stats.py) and the image-blind baselines (mllm/eval/blind.py)."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from mllm.boxes import iou
from mllm.eval.blind import (
    best_box_per_key,
    best_constant_box,
    iou_matrix,
    majority_answers,
    predict_by_backoff,
)
from mllm.eval.stats import binomial_p_value, mcnemar, pair_accuracy, proportion_interval


def tail(k: int, n: int, p: float) -> float:
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_proportion_interval_is_clopper_pearson() -> None:
    low, high = proportion_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))
    low, high = proportion_interval(10, 10)
    assert low == pytest.approx(0.025 ** (1 / 10)) and high == 1.0
    low, high = proportion_interval(83, 150)
    assert low < 83 / 150 < high and high - low < 0.17
    # the bounds are where the tails reach 2.5%
    assert tail(83, 150, low) == pytest.approx(0.025, rel=1e-4)
    assert proportion_interval(0, 0) == (0.0, 1.0)


def test_binomial_p_value_matches_the_sum() -> None:
    assert binomial_p_value(356, 600, 0.5) == pytest.approx(tail(356, 600, 0.5), rel=1e-9)
    assert binomial_p_value(29, 400, 0.02) == pytest.approx(tail(29, 400, 0.02), rel=1e-9)
    assert binomial_p_value(0, 0, 0.5) == 1.0


def test_mcnemar_counts_only_the_disagreements() -> None:
    model = [True] * 30 + [True] * 10 + [False] * 2 + [False] * 8
    baseline = [True] * 30 + [False] * 10 + [True] * 2 + [False] * 8
    result = mcnemar(model, baseline)
    assert (result.n, result.model_correct, result.baseline_correct) == (50, 40, 32)
    assert (result.model_only, result.baseline_only) == (10, 2)
    assert result.p_model_better == pytest.approx(tail(10, 12, 0.5))
    assert result.p_value == pytest.approx(2 * tail(10, 12, 0.5))
    # the agreements do not matter: the same disagreements in a bigger pile give the same p-value
    bigger = mcnemar(model + [True] * 500, baseline + [True] * 500)
    assert bigger.p_value == pytest.approx(result.p_value)
    assert mcnemar([True, False], [True, False]).p_value == 1.0
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])


def test_pair_accuracy_needs_both_questions_right() -> None:
    correct = [True, True, True, False, False, False, True]
    keys = ["a", "a", "b", "b", "c", "c", "lonely"]
    answers = ["yes", "no", "yes", "yes", "no", "yes", "yes"]
    result = pair_accuracy(correct, keys, answers)
    assert (result.pairs, result.both_right, result.same_answer) == (3, 1, 1)
    assert result.accuracy == pytest.approx(1 / 3)
    # a model that says "yes" to everything gets every pair half right and no pair whole
    always_yes = pair_accuracy([True, False] * 50, [k // 2 for k in range(100)], ["yes"] * 100)
    assert always_yes.accuracy == 0.0 and always_yes.same_answer == 50


def test_majority_answers_and_backoff() -> None:
    keys = ["is it red", "is it red", "is it red", "is it blue", "is it blue", "count"]
    answers = ["yes", "yes", "no", "no", "yes", "no"]
    table = majority_answers(keys, answers)
    assert table == {
        "is it red": "yes",
        "is it blue": "no",
        "count": "no",
    }  # the tie goes to the overall majority
    coarse = {"template": "yes"}
    predicted = predict_by_backoff(
        [table, coarse], [["is it red", "template"], ["unseen", "template"], ["unseen", "other"]], "no"
    )
    assert predicted == ["yes", "yes", "no"]


def test_iou_matrix_matches_the_scorer() -> None:
    rng = np.random.default_rng(0)
    a = np.sort(rng.uniform(0, 100, size=(7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.uniform(0, 100, size=(5, 2, 2)), axis=1).transpose(0, 2, 1).reshape(5, 4)[:, [0, 2, 1, 3]]
    matrix = iou_matrix(a, b)
    for i in range(7):
        for j in range(5):
            assert matrix[i, j] == pytest.approx(iou(a[i], b[j]))
    assert iou_matrix(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0] == 0.0  # empty union


def test_best_constant_box_beats_the_mean_box_on_two_clusters() -> None:
    left = [[0, 0, 20, 20], [1, 1, 21, 21], [2, 0, 22, 20]] * 3
    right = [[80, 80, 100, 100], [81, 80, 101, 100]] * 3
    boxes = left + right
    box, hits = best_constant_box(boxes)
    assert hits == len(left) and iou(box, [0, 0, 20, 20]) > 0.5
    mean = np.mean(boxes, 0)
    assert sum(iou(mean, b) >= 0.5 for b in boxes) == 0  # the mean box sits between the clusters
    per_key = best_box_per_key(["left"] * len(left) + ["right"] * len(right), boxes, min_count=7)
    assert set(per_key) == {"left"}  # "right" has 6 boxes, under min_count
    with pytest.raises(ValueError):
        best_constant_box([])
