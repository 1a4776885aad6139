"""The demo's honest figures (mllm/demo/metrics.py): templates, place phrases, yes/no and grounding metrics against
image-blind rules fit on training data, and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm.demo.config import demo_config
from mllm.demo.metrics import (
    grounding_metrics,
    position_phrase_of,
    template_of,
    write_metrics,
    yes_no_metrics,
)


def test_templates_and_place_phrases() -> None:
    assert template_of("Is the square red?") == "Is the {shape} {color}?"
    assert (
        template_of("Are there exactly 3 objects in the image?")
        == "Are there exactly {n} objects in the image?"
    )
    assert template_of("the orange stars at the top left") == "the {color} {shape} at the top left"
    assert position_phrase_of("the red circle at the top left") == "at the top left"
    assert position_phrase_of("the red circle on the left") == "on the left"
    assert position_phrase_of("the red circle in the center") == "in the center"
    assert position_phrase_of("the red circle") is None


def item(image: str, question: str, answer: str) -> dict:
    return {
        "image": image,
        "conversations": [
            {"role": "user", "content": "<image>\n" + question + " Please answer yes or no."},
            {"role": "assistant", "content": answer},
        ],
    }


def prediction(category: str, reference: str, answer: str) -> dict:
    return {
        "category": category,
        "reference": reference,
        "normalised": answer,
        "correct": answer == reference,
    }


def test_yes_no_metrics_pairs_categories_and_blind_rules() -> None:
    # Training: "Is the square red?" is always Yes, "Is the square blue?" always No; counts are Yes/No alike.
    train = [item("images/color/t.png", "Is the square red?", "Yes")] * 3
    train += [item("images/color/t.png", "Is the square blue?", "No")] * 3
    train += [item("images/count/t.png", "Are there exactly 2 objects in the image?", "No")] * 2
    # a training image carries questions of other categories than its folder's: these three are colour questions
    train += [item("images/count/u.png", "Is the circle green?", "Yes")] * 3
    test = [
        item("images/color/a.png", "Is the square red?", "Yes"),
        item("images/color/a.png", "Is the square blue?", "No"),
        item("images/count/b.png", "Are there exactly 2 objects in the image?", "Yes"),
        item("images/count/b.png", "Are there exactly 3 objects in the image?", "No"),
    ]
    predictions = [
        prediction("color", "yes", "yes"),
        prediction("color", "no", "no"),
        prediction("count", "yes", "yes"),
        prediction("count", "no", "yes"),
    ]
    metrics = yes_no_metrics(predictions, test, train)
    assert metrics["accuracy"] == 0.75 and metrics["n"] == 4
    assert (metrics["pairs"], metrics["pairs_both_right"], metrics["pairs_same_answer"]) == (2, 1, 1)
    assert metrics["pair_accuracy"] == 0.5
    assert metrics["per_category"]["count"]["accuracy"] == 0.5
    assert metrics["per_category"]["color"]["ci95"][0] < 1.0 == metrics["per_category"]["color"]["ci95"][1]
    # per exact question the blind rule knows the colour questions and backs off to the template for count 3;
    # the count template's training answer is "No": it gets 3 of 4, as many as the model
    exact = metrics["blind"]["majority per question"]
    assert exact["baseline_correct"] == 3 and (exact["model_only"], exact["baseline_only"]) == (1, 1)
    assert exact["p_value"] == pytest.approx(1.0)
    assert metrics["blind_accuracy"] == 0.75
    # per category, read from the questions: colour 6:3 "yes", count 2:0 "no" (by image folder it would be colour
    # 3:3 and count 3:2 "yes", right on the colour Yes and the count Yes instead)
    by_category = metrics["blind"]["majority per category"]
    assert by_category["baseline_correct"] == 2 and (
        by_category["model_only"],
        by_category["baseline_only"],
    ) == (2, 1)
    with pytest.raises(ValueError, match="not a toy yes/no question"):
        description = {
            "id": "d1",
            "image": "images/color/t.png",
            "conversations": [
                {"role": "user", "content": "<image>\nDescribe the image."},
                {"role": "assistant", "content": "A square."},
            ],
        }
        yes_no_metrics(predictions, test, train + [description])
    with pytest.raises(ValueError, match="predictions"):
        yes_no_metrics(predictions[:3], test, train)


def record(expression: str, box: list[float]) -> dict:
    return {"expression": expression, "bbox": box}


def test_grounding_metrics_against_blind_boxes() -> None:
    top_left, bottom_right = [0, 0, 30, 30], [80, 80, 110, 110]
    train = [record("the red circle at the top left", top_left)] * 6
    train += [record("the blue star at the bottom right", bottom_right)] * 6
    train += [record("the green square", top_left)] * 5 + [record("the green square", bottom_right)] * 7
    test = [
        record("the purple cross at the top left", top_left),
        record("the orange star at the bottom right", bottom_right),
        record("the yellow circle", top_left),
        record("the red cross", bottom_right),
    ]
    scored = [{"correct": flag} for flag in (True, False, True, True)]
    metrics = grounding_metrics(scored, test, train)
    assert metrics["acc"] == 0.75 and metrics["n"] == 4
    by_phrase = metrics["blind"]["best box per position phrase"]
    # the place phrases put the boxes right; without a phrase it backs off to the best constant box
    # (bottom right: 13 of the 24 training boxes), right for the 4th expression only
    assert by_phrase["baseline_correct"] == 3
    assert metrics["blind"]["best constant box"]["baseline_correct"] == 2
    assert metrics["blind"]["mean training box"]["baseline_correct"] == 0
    assert metrics["blind_acc"] == 0.75 and metrics["blind_best"] == "best box per position phrase"
    plain = metrics["without_position_phrase"]
    assert plain["n"] == 2 and (plain["model_correct"], plain["baseline_correct"]) == (2, 1)
    assert "by_objects" not in metrics


def test_grounding_accuracy_split_by_the_objects_in_the_image() -> None:
    box = [0, 0, 30, 30]
    train = [record("the red circle", box)] * 6
    test = [
        {**record(e, box), "img_path": image}
        for e, image in [("a", "one.png"), ("b", "two.png"), ("c", "two.png")]
    ]
    test[1]["bbox"] = [80, 80, 110, 110]  # the blind constant box misses it
    scored = [{"correct": flag} for flag in (False, True, False)]
    metrics = grounding_metrics(scored, test, train, {"one.png": 1, "two.png": 2, "unused.png": 3})
    assert list(metrics["by_objects"]) == ["1", "2"]
    one, two = metrics["by_objects"]["1"], metrics["by_objects"]["2"]
    assert (one["n"], one["correct"], one["blind_correct"]) == (1, 0, 1)
    assert (two["n"], two["correct"], two["acc"], two["blind_correct"], two["blind_acc"]) == (
        2,
        1,
        0.5,
        1,
        0.5,
    )


def test_write_metrics_has_one_block_per_evaluation(tmp_path: Path) -> None:
    config = demo_config(tmp_path, seed=3)
    figures = {
        "eval_sft": {"yes_no": {"accuracy": 0.8}, "grounding": {"acc": 0.3}, "chair": {}, "summary": "x"},
        "world": {"summary": "y"},
    }
    path = write_metrics(config, figures)
    data = json.loads(path.read_text())
    assert data["seed"] == 3 and data["after_sft"]["yes_no"]["accuracy"] == 0.8
    assert "after_preference" not in data and "summary" not in data["after_sft"]
