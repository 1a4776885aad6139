"""The full `mllm demo` (what `make demo` runs, seed 0), read as a skeptic would (issue 26), from OUT/metrics.json.

The thresholds were fixed on 2026-12-04 from the seed-0 run of that day's recipe, before the runs of seeds 1-4, and
left unchanged when the `questions` stage joined the recipe (2026-12-05); where issue 26's criterion is reached the
issue's own value is asserted. Measured on seed 0, 2026-12-04 recipe -> with the `questions` stage:
- every part-1 metric is written for both models (`after_sft`, `after_preference`), with intervals, MME pair accuracy
  and image-blind baselines fit on the training data, each compared with the model on the same items (McNemar);
- yes/no after SFT beats every image-blind rule by McNemar's exact one-sided test (77.3% -> 78.3% against at most
  51.7%, p < 1e-18); every category >= 65% (the issue's value; colour 85.3 -> 89.3, count 79.3 -> 82.7, existence
  69.3 -> 72.7, position 75.3 -> 68.7) and above chance; MME pair accuracy >= 60% (the issue's value; 61.7 -> 62.0%);
- Acc@0.5 after SFT beats the mean training box on the same expressions (6.25 -> 5.0% against 2.0%, one-sided p 0.002
  -> 0.018);
- greedy CHAIRi <= 10% (4.0 -> 5.0%), and preference training cuts the sampled CHAIRi by >= 30% (12.3 -> 5.8, then
  13.7 -> 8.1) while recall, yes/no and Acc@0.5 fall by at most 5, 3 and 3 points (the issue's values).

Not asserted, because the demo does not reach them (issue 26, part 2, stays open): yes/no >= 80% overall (78.3%), and
grounding: Acc@0.5 >= 30% and 15 points above the best image-blind rule (the best box per position phrase: 7.75%
against the model's 5.0%). Nor is the recipe's robustness across seeds; see the README's table of seeds 0-4. The
`--fast` demo (tests/test_demo.py) is too short for any of this, so this file runs the whole demo (about 14 minutes on
CI's 2 cores).
"""

from __future__ import annotations

import json

import pytest

from mllm.cli import main
from mllm.demo.metrics import METRICS_KEYS, metric

P_VALUE = 0.01
MIN_YES_NO = 0.75
"""Measured 0.773 on seed 0, 0.783 with the `questions` stage (issue 26 asks for 0.80: not reached)."""
MIN_CATEGORY = 0.65
"""Issue 26's value; measured at least 0.693 on seed 0 (0.687 with the `questions` stage)."""
MIN_PAIR_ACCURACY = 0.60
"""Issue 26's value; measured 0.617 on seed 0 (0.620 with the `questions` stage)."""
MIN_GROUNDING_P = 0.05
"""One-sided McNemar p of the boxes against the mean training box; measured 0.002 (0.018 with the `questions`
stage)."""
MAX_GREEDY_CHAIRI = 0.10
MAX_SAMPLED_CHAIRI_RATIO = 0.70
MAX_RECALL_DROP = 0.05
MAX_PREFERENCE_DROP = 0.03


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "full"
    assert main(["demo", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_full_demo_writes_every_part_1_metric(metrics: dict) -> None:
    for name in ("after_sft", "after_preference"):
        block = metrics[name]
        for key in METRICS_KEYS:
            value = metric(block, key)
            assert isinstance(value, float) and 0.0 <= value <= 1.0, (name, key, value)
        yes_no, grounding = block["yes_no"], block["grounding"]
        assert yes_no["n"] == 600 and yes_no["pairs"] == 300 and grounding["n"] == 400
        assert yes_no["ci95"][0] <= yes_no["accuracy"] <= yes_no["ci95"][1]
        assert grounding["ci95"][0] <= grounding["acc"] <= grounding["ci95"][1]
        assert set(yes_no["blind"]) == {
            "majority per category",
            "majority per question template",
            "majority per question",
        }
        assert {"mean training box", "best constant box", "best box per position phrase"} <= set(
            grounding["blind"]
        )
        assert yes_no["blind_accuracy"] == max(c["baseline_accuracy"] for c in yes_no["blind"].values())
        assert grounding["blind_acc"] == max(c["baseline_accuracy"] for c in grounding["blind"].values())


@pytest.mark.slow
def test_full_demo_answers_yes_no_better_than_every_image_blind_rule(metrics: dict) -> None:
    yes_no = metrics["after_sft"]["yes_no"]
    assert yes_no["accuracy"] >= MIN_YES_NO, yes_no["accuracy"]
    for name, comparison in yes_no["blind"].items():
        assert comparison["model_correct"] > comparison["baseline_correct"], name
        assert comparison["p_model_better"] < P_VALUE, (name, comparison)
    assert yes_no["pair_accuracy"] >= MIN_PAIR_ACCURACY, yes_no["pair_accuracy"]
    assert set(yes_no["per_category"]) == {"color", "count", "existence", "position"}
    for name, category in yes_no["per_category"].items():
        assert category["accuracy"] >= MIN_CATEGORY and category["p_chance"] < P_VALUE, (name, category)


@pytest.mark.slow
def test_full_demo_boxes_beat_the_mean_training_box(metrics: dict) -> None:
    mean_box = metrics["after_sft"]["grounding"]["blind"]["mean training box"]
    assert mean_box["model_correct"] > mean_box["baseline_correct"]
    assert mean_box["p_model_better"] < MIN_GROUNDING_P, mean_box


@pytest.mark.slow
def test_full_demo_hallucinates_less_after_preference_training(metrics: dict) -> None:
    before, after = metrics["after_sft"], metrics["after_preference"]
    assert before["chair"]["greedy"]["CHAIRi"] <= MAX_GREEDY_CHAIRI
    sampled_before, sampled_after = before["chair"]["sampled"], after["chair"]["sampled"]
    assert sampled_after["CHAIRi"] <= MAX_SAMPLED_CHAIRI_RATIO * sampled_before["CHAIRi"], (before, after)
    assert sampled_after["Recall"] >= sampled_before["Recall"] - MAX_RECALL_DROP
    assert after["yes_no"]["accuracy"] >= before["yes_no"]["accuracy"] - MAX_PREFERENCE_DROP
    assert after["grounding"]["acc"] >= before["grounding"]["acc"] - MAX_PREFERENCE_DROP
