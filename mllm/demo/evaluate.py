"""Demo evaluation stage: yes/no accuracy, CHAIR (greedy and sampled) and grounding Acc@0.5 of one model.

Each part calls the functions behind a command: `mllm eval vqa` (mllm.eval.vqa), `mllm answer` + `mllm eval chair`
(mllm.eval.answer, mllm.eval.chair with the toy synonyms) and `mllm score-grounding` (mllm.eval.grounding_score). Every
answers/predictions file is appended per batch and skips finished items, so an interrupted evaluation resumes.

Beside the raw figures each part reports what a skeptic asks for (mllm/demo/metrics.py): intervals, MME's pair
accuracy, and image-blind baselines fit on the training files only, compared with the model on the same items by
McNemar's exact test. The baselines are computed, not assumed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from mllm.demo.build import world_dir
from mllm.demo.config import DemoConfig
from mllm.demo.metrics import grounding_metrics, yes_no_metrics

logger = logging.getLogger(__name__)

GROUNDING_PROMPT = "Where is {expr} in image? answer in [x0,y0,x1,y1] format."
"""The RefCOCO evaluation prompt (REFERENCE.md section 2), also the toy world's first REC template."""
YES_NO_SUFFIX = "Please answer yes or no."
GROUNDING_SPLIT = "toy_rec_val"


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# yes/no


def yes_no_test_file(config: DemoConfig, folder: Path) -> Path:
    """The yes/no items of the SFT test file (its descriptions are scored by CHAIR instead), first eval_yes_no."""
    items = json.loads((world_dir(config) / "sft" / "test.json").read_text(encoding="utf-8"))
    yes_no = [item for item in items if YES_NO_SUFFIX in item["conversations"][0]["content"]]
    path = folder / "yes_no_test.json"
    write_json(path, yes_no[: config.eval_yes_no])
    return path


def eval_yes_no(model, processor, config: DemoConfig, folder: Path, model_name: str) -> dict[str, Any]:
    from mllm.eval.vqa import load_vqa_items, model_vqa_fn, predict, report_markdown, score_predictions

    items = load_vqa_items(yes_no_test_file(config, folder), world_dir(config))
    records = predict(
        items,
        folder / "yes_no_predictions.jsonl",
        model_vqa_fn(model, processor),
        model_name,
        config.eval_batch_size,
    )
    report = score_predictions(records)
    (folder / "yes_no.md").write_text(report_markdown(report, "Yes/no accuracy"), encoding="utf-8")
    test_items = json.loads((folder / "yes_no_test.json").read_text(encoding="utf-8"))
    train_items = [
        item
        for item in json.loads((world_dir(config) / "sft" / "train.json").read_text(encoding="utf-8"))
        if YES_NO_SUFFIX in item["conversations"][0]["content"]
    ]
    return {"invalid": report.overall.invalid, **yes_no_metrics(records, test_items, train_items)}


# --------------------------------------------------------------------------------------------------------------
# CHAIR


def sampling_kwargs(config: DemoConfig) -> dict[str, Any]:
    """Plain sampling at temperature 1 (no nucleus/top-k cut, no repetition penalty): it shows what the model
    believes, which is where the noisy captions' hallucinations appear."""
    from mllm.model.chat import decoding_kwargs

    return decoding_kwargs(
        "sampling",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
    )


def describe(
    model, processor, config: DemoConfig, out: Path, kwargs: dict[str, Any], seed: int | None, name: str
):
    """`mllm answer` on the objhal bench (first eval_chair images) into `out`; seeded when sampling."""
    import torch

    from mllm.eval.answer import generate_answers, model_answer_fn

    if seed is not None:
        torch.manual_seed(seed)
    generate_answers(
        world_dir(config) / "objhal_bench.jsonl",
        out,
        model_answer_fn(model, processor, kwargs),
        name,
        config.eval_batch_size,
        config.eval_chair,
    )


def eval_chair(model, processor, config: DemoConfig, folder: Path, model_name: str) -> dict[str, Any]:
    """CHAIR of greedy descriptions and of `chair_samples` sampled descriptions per image (scored together)."""
    from mllm.eval.chair import load_evaluator, read_answers, score_answers
    from mllm.model.chat import decoding_kwargs

    world = world_dir(config)
    greedy = folder / "answers_greedy.jsonl"
    describe(
        model,
        processor,
        config,
        greedy,
        decoding_kwargs("greedy", max_new_tokens=config.max_new_tokens),
        None,
        model_name,
    )
    sampled = []
    for k in range(config.chair_samples):
        path = folder / f"answers_sampled_{k}.jsonl"
        describe(model, processor, config, path, sampling_kwargs(config), config.seed * 1000 + k, model_name)
        sampled.append(path)
    evaluator = load_evaluator(
        coco_path=world / "coco",
        cache=folder / "chair_ground_truth.json",
        synonyms=world / "coco" / "synonyms.txt",
        nlp="builtin",
    )
    result = {"greedy": score_answers(evaluator, read_answers(greedy))["overall_metrics"]}
    if sampled:
        answers = [a for path in sampled for a in read_answers(path)]
        result["sampled"] = score_answers(evaluator, answers)["overall_metrics"]
    return result


# --------------------------------------------------------------------------------------------------------------
# grounding


def grounding_questions(config: DemoConfig, folder: Path, records: list[dict[str, Any]]) -> Path:
    """The first eval_grounding of the REC validation `records` as an objhal-style question file (absolute image
    paths; the record's fields travel in `metainfos` to the predictions file)."""
    world = world_dir(config)
    questions = [
        {
            "image": str((world / r["img_path"]).resolve()),
            "question": GROUNDING_PROMPT.format(expr=r["expression"]),
            **r,
        }
        for r in records[: config.eval_grounding]
    ]
    path = folder / "grounding_questions.jsonl"
    write_jsonl(path, questions)
    return path


def eval_grounding(model, processor, config: DemoConfig, folder: Path, model_name: str) -> dict[str, Any]:
    """Greedy boxes for the held-out expressions, scored by Acc@0.5; the image-blind boxes beside them."""
    from mllm.eval.answer import generate_answers, model_answer_fn
    from mllm.eval.grounding_score import score_predictions
    from mllm.model.chat import decoding_kwargs

    world = world_dir(config)
    split = read_jsonl(world / "grounding" / "rec_val.jsonl")
    answers = folder / "grounding_answers.jsonl"
    generate_answers(
        grounding_questions(config, folder, split),
        answers,
        model_answer_fn(model, processor, decoding_kwargs("greedy", max_new_tokens=24)),
        model_name,
        config.eval_batch_size,
    )
    predictions = [
        {**a["metainfos"], "answer": a["answer"], "split": GROUNDING_SPLIT} for a in read_jsonl(answers)
    ]
    write_jsonl(folder / "grounding_predictions.jsonl", predictions)
    scored = score_predictions(folder / "grounding_predictions.jsonl", image_root=world)
    train_records = read_jsonl(world / "grounding" / "rec_train.jsonl")
    # the world writes one REC record per object, so an image's records in the whole split are its objects
    objects = Counter(r["img_path"] for r in split)
    metrics = grounding_metrics(scored["items"], predictions, train_records, objects)
    return {
        **metrics,
        "unparsable": scored["overall"]["unparsable"],
        "baseline_acc": metrics["blind"]["mean training box"]["baseline_accuracy"],
    }


def grounding_pictures(config: DemoConfig, folder: Path, out_dir: Path, n: int) -> list[Path]:
    """Pictures (true box green, predicted red) of the first n grounded expressions of an evaluation folder."""
    from mllm.eval.grounding_score import score_predictions, visualize_items

    scored = score_predictions(folder / "grounding_predictions.jsonl", image_root=world_dir(config))
    return visualize_items(scored["items"][:n], out_dir)


# --------------------------------------------------------------------------------------------------------------
# the stage


def evaluate_model(config: DemoConfig, folder: Path, model_dir: Path) -> dict[str, Any]:
    """All three evaluations of the model in `model_dir`; outputs and figures in `folder`."""
    import torch

    from mllm.api import load

    model, processor = load(model_dir, config.torch_device(), "float32")
    name = str(Path(model_dir).resolve())
    with torch.inference_mode():
        yes_no = eval_yes_no(model, processor, config, folder, name) if config.eval_yes_no else None
        chair = eval_chair(model, processor, config, folder, name) if config.eval_chair else None
        grounding = eval_grounding(model, processor, config, folder, name) if config.eval_grounding else None
    parts = []
    if yes_no:
        parts.append(
            f"yes/no {100 * yes_no['accuracy']:.1f}% (pairs {100 * yes_no['pair_accuracy']:.1f}%, "
            f"blind {100 * yes_no['blind_accuracy']:.1f}%)"
        )
    if chair:
        g = chair["greedy"]
        parts.append(f"CHAIRs/CHAIRi greedy {100 * g['CHAIRs']:.1f}/{100 * g['CHAIRi']:.1f}")
        if "sampled" in chair:
            s = chair["sampled"]
            parts.append(f"sampled {100 * s['CHAIRs']:.1f}/{100 * s['CHAIRi']:.1f}")
    if grounding:
        parts.append(
            f"Acc@0.5 {100 * grounding['acc']:.1f}% (blind {100 * grounding['blind_acc']:.1f}%, "
            f"mean box {100 * grounding['baseline_acc']:.1f}%)"
        )
    return {
        "model_dir": str(model_dir),
        "yes_no": yes_no,
        "chair": chair,
        "grounding": grounding,
        "summary": ", ".join(parts),
    }
