"""REPORT.md of `mllm demo`: stage times, the before/after table, curves, grounding pictures, example answers.

Everything is read back from the stages' folders (done.json figures, answers files, PNGs), so the report can be
rebuilt at any time without recomputing anything; pictures it makes go to OUT/report/.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mllm.demo.build import world_dir
from mllm.demo.config import DemoConfig
from mllm.demo.sft import questions_data_kinds
from mllm.demo.stages import StageRecord

REPORT = "REPORT.md"
N_GROUNDING_PICTURES = 8
N_EXAMPLES = 4


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def metric_rows(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """Rows of the before/after table (values in percent)."""

    def get(figures: dict[str, Any] | None, *path: str) -> float | None:
        value: Any = figures
        for key in path:
            if not isinstance(value, dict) or value.get(key) is None:
                return None
            value = value[key]
        return value

    categories = sorted(get(before, "yes_no", "per_category") or get(after, "yes_no", "per_category") or {})
    rows = [
        ("yes/no accuracy", ("yes_no", "accuracy")),
        *((f"yes/no accuracy, {c} questions", ("yes_no", "per_category", c, "accuracy")) for c in categories),
        ("yes/no pair accuracy (both questions of an image right)", ("yes_no", "pair_accuracy")),
        ("yes/no, best image-blind rule", ("yes_no", "blind_accuracy")),
        ("CHAIRs, greedy", ("chair", "greedy", "CHAIRs")),
        ("CHAIRi, greedy", ("chair", "greedy", "CHAIRi")),
        ("Recall, greedy", ("chair", "greedy", "Recall")),
        ("CHAIRs, sampled (T=1)", ("chair", "sampled", "CHAIRs")),
        ("CHAIRi, sampled (T=1)", ("chair", "sampled", "CHAIRi")),
        ("Recall, sampled (T=1)", ("chair", "sampled", "Recall")),
        ("grounding Acc@0.5", ("grounding", "acc")),
        ("grounding, best image-blind box", ("grounding", "blind_acc")),
        ("grounding, mean training box", ("grounding", "baseline_acc")),
    ]
    return [f"| {label} | {pct(get(before, *path))} | {pct(get(after, *path))} |" for label, path in rows]


def evidence_section(figures: dict[str, Any] | None, label: str) -> list[str]:
    """The model against chance and every image-blind rule on the same items: accuracies with 95% intervals and
    McNemar's exact p-values (two-sided)."""
    if not figures:
        return []
    lines = [f"## The evidence ({label})", ""]
    yes_no, grounding = figures.get("yes_no"), figures.get("grounding")
    if yes_no:
        low, high = yes_no["ci95"]
        lines += [
            f"Yes/no: {yes_no['correct']} of {yes_no['n']} right ({pct(yes_no['accuracy'])}%, 95% interval "
            f"{pct(low)}-{pct(high)}; p against chance {yes_no['p_chance']:.1g}); pairs with both questions right "
            f"{yes_no['pairs_both_right']} of {yes_no['pairs']}, pairs answered alike {yes_no['pairs_same_answer']}.",
            "",
            "| category | right | accuracy | 95% interval | p against chance |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, c in yes_no["per_category"].items():
            lines.append(
                f"| {name} | {c['correct']}/{c['n']} | {pct(c['accuracy'])} | {pct(c['ci95'][0])}-{pct(c['ci95'][1])} "
                f"| {c['p_chance']:.1g} |"
            )
        lines += ["", *comparison_table(yes_no["blind"]), ""]
    if grounding:
        low, high = grounding["ci95"]
        plain = grounding["without_position_phrase"]
        lines += [
            f"Grounding: {grounding['correct']} of {grounding['n']} boxes at IoU >= 0.5 ({pct(grounding['acc'])}%, "
            f"95% interval {pct(low)}-{pct(high)}). On the {plain['n']} expressions without a place phrase: model "
            f"{pct(plain['model_accuracy'])}%, best constant box {pct(plain['baseline_accuracy'])}% (p "
            f"{plain['p_value']:.1g}).",
            "",
            *comparison_table(grounding["blind"]),
            "",
        ]
        if grounding.get("by_objects"):
            split = "; ".join(
                f"{count} object{'s' if count != '1' else ''}: {c['correct']}/{c['n']} ({pct(c['acc'])}%, best blind "
                f"rule {pct(c['blind_acc'])}%)"
                for count, c in grounding["by_objects"].items()
            )
            lines += [f"By the objects in the image: {split}.", ""]
    return lines


def comparison_table(blind: dict[str, dict[str, Any]]) -> list[str]:
    """One row per image-blind rule: its accuracy, the disagreements and McNemar's exact p-value."""
    lines = [
        "| image-blind rule (fit on the training data) | its accuracy | model right, rule wrong | rule right, "
        "model wrong | McNemar p |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in blind.items():
        lines.append(
            f"| {name} | {pct(c['baseline_accuracy'])} | {c['model_only']} | {c['baseline_only']} | {c['p_value']:.1g} |"
        )
    return lines


def grounding_grid(pictures: list[Path], out_png: Path, columns: int = 4) -> Path | None:
    """One PNG with the grounding pictures side by side (what the README shows)."""
    from PIL import Image

    if not pictures:
        return None
    images = [Image.open(p).convert("RGB") for p in pictures]
    width, height = max(i.width for i in images), max(i.height for i in images)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    grid.save(out_png)
    return out_png


def answers_by_image(path: Path) -> dict[Any, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["image_id"]] = record["answer"]
    return out


def example_section(config: DemoConfig, report_dir: Path) -> list[str]:
    """The first images of the CHAIR bench with the truth and the answers before/after preference training."""
    world = world_dir(config)
    scenes = {s["image_id"]: s for s in json.loads((world / "scenes.json").read_text())["scenes"]}
    sources = {
        "greedy, after SFT": config.out / "eval_sft" / "answers_greedy.jsonl",
        "sampled, after SFT": config.out / "eval_sft" / "answers_sampled_0.jsonl",
        "greedy, after preference": config.out / "eval_preference" / "answers_greedy.jsonl",
        "sampled, after preference": config.out / "eval_preference" / "answers_sampled_0.jsonl",
    }
    answers = {label: answers_by_image(path) for label, path in sources.items()}
    image_ids = list(answers["greedy, after SFT"])[:N_EXAMPLES]
    if not image_ids:
        return []
    lines = ["## Example answers before and after preference training", ""]
    (report_dir / "examples").mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        scene = scenes[image_id]
        picture = report_dir / "examples" / f"{image_id}.png"
        picture.write_bytes((world / scene["image"]).read_bytes())
        lines += [
            f"![image {image_id}](report/examples/{image_id}.png)",
            "",
            f"- truth: {scene['description']}",
        ]
        for label, by_image in answers.items():
            if image_id in by_image:
                lines.append(f"- {label}: {by_image[image_id]}")
        lines.append("")
    return lines


def build_report(config: DemoConfig, records: dict[str, StageRecord]) -> Path:
    """Write OUT/REPORT.md (and OUT/report/*.png) from the finished stages."""
    from mllm.demo.evaluate import grounding_pictures

    report_dir = config.out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = {name: record.figures for name, record in records.items()}
    lines = [
        "# mllm demo report",
        "",
        f"Seed {config.seed}, {'--fast' if config.fast else 'full'} settings: {config.n_train} training and "
        f"{config.n_test} held-out images, {config.vision_steps} vision stage steps, {config.sft_steps} SFT steps "
        f"(batch {config.sft_batch_size}), "
        f"{config.preference_steps} preference steps ({config.preference_loss}, beta {config.preference_beta}, "
        f"lr {config.preference_lr}). {config.threads} torch threads on a machine with {os.cpu_count()} CPUs; the "
        f"vision and SFT stages in {config.training_precision()} (`bf16`). "
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        "## Time per stage",
        "",
        "| stage | seconds | summary |",
        "|---|---:|---|",
    ]
    total = 0.0
    for name, record in records.items():
        total += record.seconds
        lines.append(f"| {name} | {record.seconds:.0f} | {record.figures.get('summary', '')} |")
    lines += [f"| **total** | **{total:.0f}** | |", ""]
    before, after = figures.get("eval_sft"), figures.get("eval_preference")
    lines += [
        "## Results (percent)",
        "",
        "Yes/no on the held-out questions; CHAIR on the held-out descriptions (`objhal_bench.jsonl`, toy synonyms; "
        f"sampled = {config.chair_samples} samples per image at temperature 1, fixed seeds); grounding on the "
        "held-out REC split. Image-blind rules are fit on the training files only; the sections below compare "
        "the model with each of them on the same items.",
        "",
        "| metric | after SFT | after preference training |",
        "|---|---:|---:|",
        *metric_rows(before, after),
        "",
        *evidence_section(before, "after SFT"),
        *evidence_section(after, "after preference training"),
    ]
    lines += curves_section(config)
    for stage in ("eval_preference", "eval_sft"):
        folder = config.out / stage
        if (folder / "grounding_predictions.jsonl").is_file():
            pictures = grounding_pictures(config, folder, report_dir / "grounding", N_GROUNDING_PICTURES)
            grid = grounding_grid(pictures, report_dir / "grounding.png")
            if grid is not None:
                label = "after preference training" if stage == "eval_preference" else "after SFT"
                lines += [
                    f"## Grounding ({label}): true box green, predicted box red",
                    "",
                    "![grounding](report/grounding.png)",
                    "",
                ]
            break
    lines += example_section(config, report_dir)
    path = config.out / REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def curves_section(config: DemoConfig) -> list[str]:
    lines = []
    questions = questions_data_kinds(config)
    pictures = [
        ("Vision stage loss (every token's shape, colour and box from the COCO boxes)", "vision/loss.png"),
        (f"First SFT stage (`align`) loss ({config.align_data} only)", "align/loss.png"),
        (f"Second SFT stage (`questions`) loss ({questions})", "questions/loss.png"),
        ("SFT loss", "sft/loss.png"),
        ("Preference loss", "preference/loss.png"),
        ("Preference rewards and margin", "preference/rewards.png"),
    ]
    present = [(title, rel) for title, rel in pictures if (config.out / rel).is_file()]
    if present:
        lines += ["## Curves", ""]
        for title, rel in present:
            lines += [f"**{title}**", "", f"![{title}]({rel})", ""]
    return lines
