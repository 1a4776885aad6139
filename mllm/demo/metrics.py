"""The demo's honest figures: intervals, MME pair accuracy, image-blind baselines and paired tests, and metrics.json.

A skeptic reads "yes/no 59%" and "Acc@0.5 5.5% against the mean box 2.0%" and asks: how wide is that interval, are
the categories all above chance or only two of them, does the model answer the two questions of a pair differently,
and would a rule that never looks at the image do as well? This module answers those from the evaluation's own
prediction files, with the pure functions of `mllm.eval.stats` and `mllm.eval.blind`:

- yes/no: accuracy overall and per category with 95% Clopper-Pearson intervals, the exact binomial p-value against
  chance, MME's pair accuracy (both questions of an image right) and the pairs answered alike; image-blind rules fit
  on the training questions only (the majority answer per category, per question template, per exact question with
  back-off to the template and the category), each compared with the model on the same questions (McNemar).
- grounding: Acc@0.5 with its interval; image-blind boxes fit on the training records only (the mean box, the best
  constant box, the best box per position phrase in the expression, per expression template, per exact expression;
  each backs off to the constant box), each compared with the model on the same expressions (McNemar), and the
  expressions without a position phrase against the constant box alone, and Acc@0.5 split by the objects in the
  image (one object: the box follows from the image alone; several: the expression must pick one out).

`blind_accuracy` / `blind_acc` is the best blind rule's accuracy on the test items (a maximum over rules, so it
favours the baselines). OUT/metrics.json holds one block per evaluated model (`after_sft`, `after_preference`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mllm.demo.config import DemoConfig
from mllm.eval.blind import (
    best_box_per_key,
    best_constant_box,
    majority_answers,
    predict_by_backoff,
)
from mllm.eval.stats import binomial_p_value, mcnemar, pair_accuracy, proportion_interval
from mllm.toy.world import COLORS, QUESTION_TYPES, SHAPES, position_phrase, yes_no_category

METRICS_FILE = "metrics.json"
MIN_KEY_RECORDS = 5
"""A per-key blind rule only answers for keys with at least this many training records (else it backs off)."""

_WORD = re.compile(r"\b(" + "|".join([*COLORS, *SHAPES, *(s + "s" for s in SHAPES), r"\d+"]) + r")\b")
POSITION_PHRASES: tuple[str, ...] = tuple(
    sorted(
        {position_phrase(v, h) for v in ("top", "middle", "bottom") for h in ("left", "center", "right")},
        key=len,
        reverse=True,
    )
)
"""The toy world's place phrases ("at the top left", "on the left", "in the center", ...), longest first."""


def template_of(text: str) -> str:
    """The text with its colour, shape and number words replaced by placeholders: the question or expression
    template ("Is the {shape} {color}?")."""

    def placeholder(match: re.Match) -> str:
        word = match.group(1)
        if word in COLORS:
            return "{color}"
        if word.isdigit():
            return "{n}"
        return "{shape}"

    return _WORD.sub(placeholder, text)


def position_phrase_of(expression: str) -> str | None:
    """The place phrase an expression ends with, if any ("the red circle at the top left" -> "at the top left")."""
    return next((p for p in POSITION_PHRASES if expression.endswith(" " + p)), None)


def interval(correct: int, n: int) -> list[float]:
    return list(proportion_interval(correct, n))


# --------------------------------------------------------------------------------------------------------------
# yes/no


def question_text(item: dict) -> str:
    """The first user turn of an SFT item without its image mark."""
    return item["conversations"][0]["content"].replace("<image>", "").strip()


def question_category(item: dict) -> str:
    """The category of a toy yes/no SFT item, read from its question (an image's folder names the category of its
    test questions only: a training image also carries questions of the other categories)."""
    category = yes_no_category(question_text(item))
    if category is None:
        raise ValueError(
            f"item {item.get('id', '?')} ({item['image']}): not a toy yes/no question: {question_text(item)!r}"
        )
    return category


def yes_no_blind_rules(train_items: list[dict]) -> dict[str, Callable[[str, str], str]]:
    """Image-blind answer rules fit on the training yes/no items: name -> fn(question, category) -> "yes"/"no"."""
    questions = [question_text(item) for item in train_items]
    answers = [item["conversations"][1]["content"].strip().lower().rstrip(".") for item in train_items]
    categories = [question_category(item) for item in train_items]
    templates = [template_of(q) for q in questions]
    by_category = majority_answers(categories, answers)
    by_template = majority_answers(templates, answers)
    by_question = majority_answers(questions, answers)
    overall = majority_answers(["all"] * len(answers), answers)["all"]

    def rule(question: str, category: str, depth: int) -> str:
        tables = [by_question, by_template, by_category][3 - depth :]
        keys = [question, template_of(question), category][3 - depth :]
        return predict_by_backoff(tables, [keys], overall)[0]

    return {
        "majority per category": lambda question, category: rule(question, category, 1),
        "majority per question template": lambda question, category: rule(question, category, 2),
        "majority per question": lambda question, category: rule(question, category, 3),
    }


def yes_no_metrics(
    predictions: list[dict], test_items: list[dict], train_items: list[dict]
) -> dict[str, Any]:
    """Accuracy with intervals, pair accuracy and blind baselines of the yes/no predictions (`mllm.eval.vqa`
    records, in the order of `test_items`, the SFT items they answer); `train_items` are the training yes/no
    items the blind rules are fit on."""
    if len(predictions) != len(test_items):
        raise ValueError(f"{len(predictions)} yes/no predictions for {len(test_items)} test items")
    correct = [bool(p["correct"]) for p in predictions]
    n, hits = len(correct), sum(correct)
    pairs = pair_accuracy(
        correct, [item["image"] for item in test_items], [p["normalised"] for p in predictions]
    )
    per_category: dict[str, dict[str, Any]] = {}
    for category in sorted({p["category"] for p in predictions}):
        flags = [c for c, p in zip(correct, predictions) if p["category"] == category]
        per_category[category] = {
            "accuracy": sum(flags) / len(flags),
            "n": len(flags),
            "correct": sum(flags),
            "ci95": interval(sum(flags), len(flags)),
            "p_chance": binomial_p_value(sum(flags), len(flags), 0.5),
        }
    blind = {}
    questions = [(question_text(item), question_category(item)) for item in test_items]
    for name, rule in yes_no_blind_rules(train_items).items():
        guesses = [rule(question, category) for question, category in questions]
        blind_correct = [g == p["reference"] for g, p in zip(guesses, predictions)]
        blind[name] = mcnemar(correct, blind_correct).to_json()
    best = max(blind, key=lambda name: blind[name]["baseline_accuracy"])
    return {
        "accuracy": hits / n,
        "n": n,
        "correct": hits,
        "ci95": interval(hits, n),
        "p_chance": binomial_p_value(hits, n, 0.5),
        "pair_accuracy": pairs.accuracy,
        "pairs": pairs.pairs,
        "pairs_both_right": pairs.both_right,
        "pairs_same_answer": pairs.same_answer,
        "per_category": per_category,
        "blind_accuracy": blind[best]["baseline_accuracy"],
        "blind_best": best,
        "blind": blind,
    }


# --------------------------------------------------------------------------------------------------------------
# grounding


def grounding_blind_boxes(train_records: list[dict]) -> dict[str, Callable[[str], list[float]]]:
    """Image-blind box rules fit on the training REC records: name -> fn(expression) -> pixel box."""
    expressions = [r["expression"] for r in train_records]
    boxes = [r["bbox"] for r in train_records]
    constant, _ = best_constant_box(boxes)
    mean = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]
    by_phrase = best_box_per_key([position_phrase_of(e) for e in expressions], boxes, MIN_KEY_RECORDS)
    by_template = best_box_per_key([template_of(e) for e in expressions], boxes, MIN_KEY_RECORDS)
    by_expression = best_box_per_key(expressions, boxes, MIN_KEY_RECORDS)

    def backoff(*tables_and_keys: tuple[dict, Callable[[str], Any]]) -> Callable[[str], list[float]]:
        def rule(expression: str) -> list[float]:
            tables = [table for table, _ in tables_and_keys]
            keys = [key(expression) for _, key in tables_and_keys]
            return predict_by_backoff(tables, [keys], constant)[0]

        return rule

    return {
        "mean training box": lambda expression: mean,
        "best constant box": lambda expression: constant,
        "best box per position phrase": backoff((by_phrase, position_phrase_of)),
        "best box per expression template": backoff((by_template, template_of)),
        "best box per expression": backoff((by_expression, lambda e: e), (by_template, template_of)),
    }


def grounding_metrics(
    scored_items: list[dict],
    records: list[dict],
    train_records: list[dict],
    objects_per_image: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Acc@0.5 with its interval and the blind baselines of the model's scored predictions (`score_predictions`
    items, in the order of `records`, the REC records they answer); `train_records` fit the blind boxes. With
    `objects_per_image` (a record's `img_path` -> objects in that image) also `by_objects`: the model's and the best
    blind rule's accuracy on the expressions of images with 1, 2, ... objects."""
    from mllm.boxes import iou

    if len(scored_items) != len(records):
        raise ValueError(f"{len(scored_items)} scored boxes for {len(records)} REC records")
    correct = [bool(item["correct"]) for item in scored_items]
    n, hits = len(correct), sum(correct)
    blind = {}
    rules = grounding_blind_boxes(train_records)
    flags_of: dict[str, list[bool]] = {}
    for name, rule in rules.items():
        flags_of[name] = [iou(rule(r["expression"]), r["bbox"]) >= 0.5 for r in records]
        blind[name] = mcnemar(correct, flags_of[name]).to_json()
    best = max(blind, key=lambda name: blind[name]["baseline_accuracy"])
    plain = [k for k, r in enumerate(records) if position_phrase_of(r["expression"]) is None]
    figures = {
        "acc": hits / n,
        "n": n,
        "correct": hits,
        "ci95": interval(hits, n),
        "blind_acc": blind[best]["baseline_accuracy"],
        "blind_best": best,
        "blind": blind,
        "without_position_phrase": mcnemar(
            [correct[k] for k in plain], [flags_of["best constant box"][k] for k in plain]
        ).to_json(),
    }
    if objects_per_image is not None:
        objects = [objects_per_image[r["img_path"]] for r in records]
        figures["by_objects"] = split_by_objects(correct, flags_of[best], objects)
    return figures


def split_by_objects(correct: list[bool], blind: list[bool], objects: list[int]) -> dict[str, dict[str, Any]]:
    """Accuracy of the model (`correct`) and of a blind rule (`blind`) per object count of the item's image, keyed
    by the count as a string (JSON keys), in increasing order."""
    split: dict[str, dict[str, Any]] = {}
    for count in sorted(set(objects)):
        items = [k for k, n in enumerate(objects) if n == count]
        hits, blind_hits = sum(correct[k] for k in items), sum(blind[k] for k in items)
        split[str(count)] = {
            "n": len(items),
            "correct": hits,
            "acc": hits / len(items),
            "blind_correct": blind_hits,
            "blind_acc": blind_hits / len(items),
        }
    return split


# --------------------------------------------------------------------------------------------------------------
# metrics.json

EVALUATIONS = {"after_sft": "eval_sft", "after_preference": "eval_preference"}
METRICS_KEYS: tuple[str, ...] = (
    "yes_no.accuracy",
    "yes_no.pair_accuracy",
    "yes_no.blind_accuracy",
    *(f"yes_no.per_category.{name}.accuracy" for name in QUESTION_TYPES),
    "grounding.acc",
    "grounding.blind_acc",
    "chair.greedy.CHAIRi",
    "chair.sampled.CHAIRi",
    "chair.sampled.Recall",
)
"""The dotted keys of every block of metrics.json that issue 26 names (each a fraction in [0, 1])."""


def metric(block: dict[str, Any], key: str) -> Any:
    """The value of a dotted key ("yes_no.per_category.count.accuracy") in a block of metrics.json."""
    for part in key.split("."):
        block = block[part]
    return block


def metrics_block(figures: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable block of one evaluation stage's figures."""
    return {key: figures.get(key) for key in ("model_dir", "yes_no", "grounding", "chair")}


def write_metrics(config: DemoConfig, figures_by_stage: dict[str, dict[str, Any]]) -> Path:
    """OUT/metrics.json: one block per evaluated model (`after_sft`, `after_preference`), written atomically."""
    from mllm.io import write_json_atomic

    payload = {
        "seed": config.seed,
        "fast": config.fast,
        **{
            block: metrics_block(figures_by_stage[stage])
            for block, stage in EVALUATIONS.items()
            if stage in figures_by_stage
        },
    }
    path = config.out / METRICS_FILE
    write_json_atomic(path, json.loads(json.dumps(payload)))
    return path
