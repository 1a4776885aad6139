"""The full `mllm demo` (what `make demo` runs, seed 0) learns from the image, read as a skeptic would (issue 26):
after SFT it answers the yes/no questions (>= 80% overall, every category >= 65%, MME pair accuracy >= 60%) and
grounds the expressions (Acc@0.5 >= 30% and >= 15 points above the best image-blind box), both better than the
best image-blind rule fit on the training data by McNemar's exact test on the same items; its greedy descriptions
hallucinate little (CHAIRi <= 10%); preference training cuts the sampled CHAIRi by 30% or more while recall falls by
at most 5 points and yes/no and grounding by at most 3.

Every figure is read from OUT/metrics.json, which the demo writes (mllm/demo/metrics.py). The thresholds are the
issue's, fixed before the final runs; the measured seeds 0-4 are in the README and docs/LOG.md. The `--fast` demo
(tests/test_demo.py) is too short for these goals, so this file runs the whole demo (about 15 minutes on CI's 2
cores).
"""

from __future__ import annotations

import json

import pytest

from mllm.cli import main

P_VALUE = 0.01
MIN_YES_NO = 0.80
MIN_YES_NO_CATEGORY = 0.65
MIN_PAIR_ACCURACY = 0.60
MIN_GROUNDING = 0.30
MIN_GROUNDING_GAIN = 0.15
MAX_GREEDY_CHAIRI = 0.10
MAX_SAMPLED_CHAIRI_RATIO = 0.70
MAX_RECALL_DROP = 0.05
MAX_PREFERENCE_DROP = 0.03


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "full"
    assert main(["demo", "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def beats_every_blind_rule(figures: dict) -> None:
    for name, comparison in figures["blind"].items():
        assert comparison["model_correct"] > comparison["baseline_correct"], name
        assert comparison["p_value"] < P_VALUE, (name, comparison)


@pytest.mark.slow
def test_full_demo_answers_yes_no_questions_from_the_image(metrics: dict) -> None:
    yes_no = metrics["after_sft"]["yes_no"]
    assert yes_no["n"] == 600 and yes_no["pairs"] == 300
    assert yes_no["accuracy"] >= MIN_YES_NO, yes_no["accuracy"]
    for name, category in yes_no["per_category"].items():
        assert category["accuracy"] >= MIN_YES_NO_CATEGORY, (name, category)
    assert yes_no["pair_accuracy"] >= MIN_PAIR_ACCURACY, yes_no["pair_accuracy"]
    beats_every_blind_rule(yes_no)


@pytest.mark.slow
def test_full_demo_grounds_expressions_from_the_image(metrics: dict) -> None:
    grounding = metrics["after_sft"]["grounding"]
    assert grounding["n"] == 400
    assert grounding["acc"] >= MIN_GROUNDING, grounding["acc"]
    assert grounding["acc"] >= grounding["blind_acc"] + MIN_GROUNDING_GAIN, grounding
    beats_every_blind_rule(grounding)


@pytest.mark.slow
def test_full_demo_hallucinates_less_after_preference_training(metrics: dict) -> None:
    before, after = metrics["after_sft"], metrics["after_preference"]
    assert before["chair"]["greedy"]["CHAIRi"] <= MAX_GREEDY_CHAIRI
    sampled_before, sampled_after = before["chair"]["sampled"], after["chair"]["sampled"]
    assert sampled_after["CHAIRi"] <= MAX_SAMPLED_CHAIRI_RATIO * sampled_before["CHAIRi"], (before, after)
    assert sampled_after["Recall"] >= sampled_before["Recall"] - MAX_RECALL_DROP
    assert after["yes_no"]["accuracy"] >= before["yes_no"]["accuracy"] - MAX_PREFERENCE_DROP
    assert after["grounding"]["acc"] >= before["grounding"]["acc"] - MAX_PREFERENCE_DROP
