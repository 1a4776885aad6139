"""Answer generation over an objhal_bench-format question file, resumable and batched.

Input lines: `{"image": <base64 or a path>, "question": ..., "image_id": ..., <any other keys>}` (a string longer
than 1000 characters is base64, as the exercise decides). Output lines, one per item, appended and flushed whole:
`{"idx", "question", "answer", "model", "metainfos", "image_id"}` where `idx` is the item's 0-based line number and
`metainfos` holds every other input key. Items already in the output are skipped, so a killed run resumes where it
stopped. An unusable item goes, with its line number and reason, to `<out>.errors.jsonl` and the run goes on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

BASE64_MIN_LENGTH = 1000
RESERVED_KEYS = ("image", "question", "image_id", "image_path")


@dataclass
class QuestionItem:
    idx: int
    question: str
    image: Image.Image | None
    image_id: Any
    metainfos: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnswerSummary:
    succeeded: int = 0
    skipped: int = 0
    failed: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds else 0.0
        return (
            f"answered {self.succeeded}, skipped {self.skipped} (already done), failed {self.failed}; "
            f"{self.new_tokens} new tokens in {self.seconds:.1f}s ({rate:.1f} tok/s)"
        )


def decode_image(value: str, base_dir: Path) -> Image.Image:
    """A base64 string (longer than 1000 characters) or a path relative to base_dir -> an RGB PIL image."""
    if len(value) > BASE64_MIN_LENGTH:
        try:
            raw = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"field 'image': broken base64 ({exc})") from exc
        source: Any = io.BytesIO(raw)
    else:
        source = Path(value) if Path(value).is_absolute() else base_dir / value
        if not source.is_file():
            raise ValueError(f"field 'image': file not found: {source}")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except OSError as exc:
        raise ValueError(f"field 'image': not a readable image ({exc})") from exc


def parse_question(line: str, idx: int, base_dir: Path) -> QuestionItem:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question' is missing or empty")
    image_value = record.get("image", record.get("image_path"))
    image = None
    if image_value is not None:
        if not isinstance(image_value, str):
            raise ValueError("field 'image' must be a base64 string or a path")
        image = decode_image(image_value, base_dir)
    metainfos = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
    return QuestionItem(idx, question, image, record.get("image_id"), metainfos)


def read_done(out_path: Path) -> set[int]:
    """idx values already answered. A torn last line (a kill mid-write) is cut off, with a warning."""
    if not out_path.exists():
        return set()
    raw = out_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw[: raw.rfind(b"\n") + 1]
        logger.warning("%s: dropping an incomplete last line left by an interrupted run", out_path)
        out_path.write_bytes(keep)
        raw = keep
    done = set()
    for n, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                done.add(int(json.loads(line)["idx"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{out_path}, line {n}: not an answer line ({exc}); refusing to append to it"
                ) from exc
    return done


def iter_questions(
    path: Path, done: set[int], errors: Callable[[int, str], None], limit: int | None
) -> Iterator[QuestionItem]:
    """Parse the question file lazily, skipping answered items and reporting bad ones."""
    with path.open(encoding="utf-8") as handle:
        for idx, line in enumerate(handle):
            if limit is not None and idx >= limit:
                return
            if idx in done or not line.strip():
                continue
            try:
                yield parse_question(line, idx, path.parent)
            except (ValueError, json.JSONDecodeError) as exc:
                errors(idx, str(exc))


def batched(items: Iterator[QuestionItem], size: int) -> Iterator[list[QuestionItem]]:
    batch: list[QuestionItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def generate_answers(
    questions_path: str | Path,
    out_path: str | Path,
    answer_fn: Callable[[list[QuestionItem]], tuple[list[str], int]],
    model_name: str,
    batch_size: int = 1,
    limit: int | None = None,
) -> AnswerSummary:
    """Run `answer_fn` (a batch of items -> (answers, number of new tokens)) over the questions file."""
    from tqdm import tqdm

    questions_path, out_path = Path(questions_path), Path(out_path)
    if not questions_path.is_file():
        raise ValueError(f"--questions: file not found: {questions_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out_path)
    summary = AnswerSummary(skipped=len(done))
    errors_path = out_path.with_name(out_path.stem + ".errors.jsonl")

    def report_error(idx: int, reason: str) -> None:
        summary.failed += 1
        logger.warning("%s, line %d: %s", questions_path, idx + 1, reason)
        with errors_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"idx": idx, "line": idx + 1, "error": reason}) + "\n")

    start = time.perf_counter()
    with out_path.open("a", encoding="utf-8") as out, tqdm(desc="answers", unit="item") as bar:
        for batch in batched(iter_questions(questions_path, done, report_error, limit), batch_size):
            answers, n_tokens = answer_fn(batch)
            for item, answer in zip(batch, answers):
                record = {
                    "idx": item.idx,
                    "question": item.question,
                    "answer": answer,
                    "model": model_name,
                    "metainfos": item.metainfos,
                    "image_id": item.image_id,
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            summary.succeeded += len(batch)
            summary.new_tokens += n_tokens
            summary.seconds = time.perf_counter() - start
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{summary.new_tokens / max(summary.seconds, 1e-9):.1f}")
    summary.seconds = time.perf_counter() - start
    return summary


def model_answer_fn(model, processor, generation_kwargs: dict[str, Any], max_slice_nums: int | None = None):
    """A batch of items -> greedy/sampled/beam answers from an MLLMModel (one generate call per batch)."""
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device

    def answer(batch: list[QuestionItem]) -> tuple[list[str], int]:
        conversations = [
            [
                {
                    "role": "user",
                    "content": [item.image, item.question] if item.image is not None else item.question,
                }
            ]
            for item in batch
        ]
        inputs = processor.chat_batch(conversations, max_slice_nums=max_slice_nums)
        tokens = model.generate(
            input_ids=inputs["input_ids"].to(device),
            pixel_values=inputs["pixel_values"],
            tgt_sizes=inputs["tgt_sizes"],
            image_bound=inputs["image_bound"],
            attention_mask=inputs["attention_mask"].to(device),
            tokenizer=tokenizer,
            **generation_kwargs,
        )
        texts = model._decode_text(tokens, tokenizer)
        stops = set(model.terminator_ids(tokenizer)) | {processor.pad_token_id}
        n_new = sum(1 for row in tokens.tolist() for tok in row if tok not in stops)
        return texts, n_new

    return answer
