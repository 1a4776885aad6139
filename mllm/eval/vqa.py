"""Yes/no VQA accuracy on an SFT-format test file (the exercise's MME-style data), overall and per category.

Each item's question is its first user turn with that turn's images; the reference is its first assistant turn. The
model answers with batched greedy decoding, through the same prompt code as training (the SFT markers become the
processor's image markers and the tokenizer's chat template renders the turn). Answers and references are normalised
the same way: first word, lower-cased, punctuation stripped at both ends; only "yes" and "no" count, so anything else
is wrong and listed in the report. The category is the folder name of the item's (first) image.

Predictions go to a `mllm.io.ResumableJsonl` file, one line per item, appended and flushed per batch: a killed run
resumes where it stopped, and a file written for other data or another model is refused rather than mixed (unless
`--overwrite`). An item whose image cannot be used goes to the errors file beside it and the others are answered.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mllm.data.sft import attach_image_markers, find_image, normalise_messages, read_json_list
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, RecordError, ResumableJsonl, open_image, run_isolated
from mllm.model.chat import decoding_kwargs, model_max_length
from mllm.processing.processor import IMAGE_MARKER

logger = logging.getLogger(__name__)

YES_NO = ("yes", "no")
NO_IMAGE_CATEGORY = "(no image)"
MAX_LISTED_INVALID = 50  # in the markdown; the JSON lists them all


@dataclass
class VQAItem:
    """One question of the test file, ready for the model."""

    idx: int  # position in the data file (the resume key)
    item_id: Any
    category: str
    question: str  # the first user turn, with the processor's image markers
    image_paths: list[Path]
    reference: str  # normalised: "yes" or "no"


@dataclass
class CategoryScore:
    category: str
    total: int = 0
    correct: int = 0
    invalid: int = 0  # answers that are neither yes nor no

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class VQAReport:
    overall: CategoryScore
    categories: list[CategoryScore]
    invalid: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def row(score: CategoryScore) -> dict[str, Any]:
            return {**asdict(score), "accuracy": score.accuracy}

        return {
            "overall": row(self.overall),
            "categories": [row(c) for c in self.categories],
            "invalid": self.invalid,
        }


def normalise_answer(text: str) -> str:
    """First word, lower-cased, with punctuation stripped from both ends ("Yes." -> "yes", "**No**" -> "no")."""
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


def first_turns(messages: list[dict[str, str]], where: str) -> tuple[str, str]:
    """(first user content, first assistant content after it)."""
    user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if user is None:
        raise ValueError(f"{where}: no user turn to take the question from")
    answer = next((m["content"] for m in messages[user + 1 :] if m["role"] == "assistant"), None)
    if answer is None:
        raise ValueError(f"{where}: no assistant turn after the first user turn (the reference answer)")
    return messages[user]["content"], answer


def parse_item(raw: Any, idx: int, data_path: Path, image_folder: Path | None) -> VQAItem:
    """One SFT item -> a VQAItem; errors name the file, the item and the reason."""
    item_id = raw.get("id", idx) if isinstance(raw, dict) else idx
    where = f"{data_path}, item {idx} (id {item_id})"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    messages, paths = attach_image_markers(normalise_messages(raw, where), raw.get("image"), where)
    question, answer = first_turns(messages, where)
    reference = normalise_answer(answer)
    if reference not in YES_NO:
        raise ValueError(f"{where}: the reference answer {answer!r:.60} is not yes or no")
    # The images of the first user turn are the first ones in prompt order.
    image_paths = [
        find_image(p, image_folder, data_path.parent, where) for p in paths[: question.count(IMAGE_MARKER)]
    ]
    category = image_paths[0].parent.name if image_paths else NO_IMAGE_CATEGORY
    return VQAItem(idx, item_id, category, question, image_paths, reference)


def load_vqa_items(
    data_path: str | Path, image_folder: str | Path | None = None, limit: int | None = None
) -> list[VQAItem]:
    """All (or the first `limit`) items of an SFT-format JSON list, checked up front."""
    data_path = Path(data_path)
    if not data_path.is_file():
        raise ValueError(f"--data: file not found: {data_path}")
    folder = Path(image_folder) if image_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--image-folder: not a folder: {folder}")
    raw_items = read_json_list(data_path)
    if limit is not None:
        raw_items = raw_items[:limit]
    items = [parse_item(raw, idx, data_path, folder) for idx, raw in enumerate(raw_items)]
    if not items:
        raise ValueError(f"--data {data_path}: no items")
    return items


def check_predictions(records: dict[int, dict[str, Any]], items: list[VQAItem], path: Path) -> None:
    """Existing predictions must belong to these items (same id and reference), or resuming would mix two runs."""
    by_idx = {item.idx: item for item in items}
    for idx, record in records.items():
        item = by_idx.get(idx)
        if item is not None and (
            record.get("id") != item.item_id or record.get("reference") != item.reference
        ):
            raise ValueError(
                f"--out {path}: item {idx} has id {record.get('id')!r} there but {item.item_id!r} in --data; "
                "it was written for another data file, use another --out (or --overwrite)"
            )


def batched(items: list[VQAItem], size: int) -> Iterator[list[VQAItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prediction_record(item: VQAItem, prediction: str, model: str) -> dict[str, Any]:
    normalised = normalise_answer(prediction)
    return {
        "idx": item.idx,
        "id": item.item_id,
        "category": item.category,
        "question": item.question,
        "reference": item.reference,
        "prediction": prediction,
        "normalised": normalised,
        "correct": normalised == item.reference,
        "model": model,
    }


def predict(
    items: list[VQAItem],
    out_path: str | Path,
    answer_fn: Callable[[list[VQAItem]], list[str]],
    model: str,
    batch_size: int = 8,
    fingerprint: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Answer the items not yet in `out_path` (a `mllm.io.ResumableJsonl` whose fingerprint is `model` plus
    `fingerprint`; a line per item) and return the predictions of every item answered. An item whose image fails
    (a RecordError from `answer_fn`) goes to `<out stem>.errors.jsonl` and the others are answered."""
    output = ResumableJsonl(out_path, {"model": model, **(fingerprint or {})}, overwrite=overwrite)
    with output:
        records = output.records()
        check_predictions(records, items, output.path)
        todo = [item for item in items if item.idx not in records]
        logger.info(
            "eval-vqa: %d items, %d already answered, %d to go", len(items), len(items) - len(todo), len(todo)
        )

        def report(item: VQAItem, exc: RecordError) -> None:
            output.error(item.idx, str(exc), source=f"item {item.idx} (id {item.item_id})", field=exc.field)

        with tqdm(total=len(todo), desc="eval-vqa", unit="item") as bar:
            for batch in batched(todo, batch_size):
                for kept, answers in run_isolated(answer_fn, batch, report):
                    new = [prediction_record(i, a, model) for i, a in zip(kept, answers, strict=True)]
                    output.append(new)
                    records.update((r["idx"], r) for r in new)
                bar.update(len(batch))
    failed = [item.idx for item in items if item.idx not in records]
    if failed:
        logger.warning("eval-vqa: %d items failed (see %s)", len(failed), output.errors_path)
    return [records[item.idx] for item in items if item.idx in records]


def score_predictions(records: list[dict[str, Any]]) -> VQAReport:
    """Accuracy overall and per category; answers that are not yes/no count as wrong and are listed."""
    if not records:
        raise ValueError("no predictions to score")
    overall = CategoryScore("overall")
    categories: dict[str, CategoryScore] = {}
    invalid = []
    for record in records:
        score = categories.setdefault(record["category"], CategoryScore(record["category"]))
        valid = record["normalised"] in YES_NO
        for target in (overall, score):
            target.total += 1
            target.correct += int(bool(record["correct"]))
            target.invalid += int(not valid)
        if not valid:
            invalid.append({k: record[k] for k in ("idx", "id", "category", "prediction")})
    return VQAReport(overall, sorted(categories.values(), key=lambda c: c.category), invalid)


def report_markdown(report: VQAReport, title: str) -> str:
    """Accuracy table (overall first) and the first answers that were neither yes nor no."""
    lines = [
        f"# {title}",
        "",
        "| category | items | correct | not yes/no | accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for score in [report.overall, *report.categories]:
        name = f"**{score.category}**" if score is report.overall else score.category
        lines.append(f"| {name} | {score.total} | {score.correct} | {score.invalid} | {score.accuracy:.3f} |")
    if report.invalid:
        lines += ["", f"Answers that are neither yes nor no ({len(report.invalid)}, counted wrong):", ""]
        for entry in report.invalid[:MAX_LISTED_INVALID]:
            lines.append(
                f"- item {entry['idx']} (id {entry['id']}, {entry['category']}): {entry['prediction']!r:.80}"
            )
        if len(report.invalid) > MAX_LISTED_INVALID:
            lines.append(f"- ... {len(report.invalid) - MAX_LISTED_INVALID} more in the JSON report")
    return "\n".join(lines) + "\n"


def report_paths(out_path: Path) -> tuple[Path, Path]:
    """`preds.jsonl` -> (`preds.accuracy.md`, `preds.accuracy.json`)."""
    stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
    return out_path.with_name(stem + ".accuracy.md"), out_path.with_name(stem + ".accuracy.json")


def model_vqa_fn(
    model,
    processor,
    max_new_tokens: int = 8,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
):
    """A batch of items -> greedy answers from an MLLMModel, one generate call per batch. An unreadable image, one
    over `max_image_pixels` or a prompt over the model's positions is a RecordError."""
    kwargs = decoding_kwargs("greedy", max_new_tokens=max_new_tokens)
    max_length = model_max_length(model)

    def answer(batch: list[VQAItem]) -> list[str]:
        images = [
            [open_image(p, f"image {p}", max_image_pixels, "image") for p in item.image_paths]
            for item in batch
        ]
        try:
            prompts = [
                processor.prepare_chat_inputs([{"role": "user", "content": item.question}])[0]
                for item in batch
            ]
            inputs = processor(prompts, images, max_length=max_length)
        except ValueError as exc:
            raise RecordError(str(exc), "conversations") from exc
        return model.generate(inputs, tokenizer=processor.tokenizer, decode_text=True, **kwargs)

    return answer
