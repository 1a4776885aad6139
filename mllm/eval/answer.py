"""Answer generation over an objhal_bench-format question file, resumable and batched.

Input lines: `{"image": <base64 or a path>, "question": ..., "image_id": ..., <any other keys>}` (a string longer
than 1000 characters is base64, as the exercise decides). Output lines, one per item, appended and flushed whole:
`{"idx", "question", "answer", "model", "metainfos", "image_id"}` where `idx` is the item's 0-based line number and
`metainfos` holds every other input key. Items already in the output are skipped, so a killed run resumes where it
stopped. An unusable item goes, with its line number and reason, to `<out>.errors.jsonl` and the run goes on.

At scale: with a `length_fn` the pending items are sorted by prompt length (longest first, in windows of
`bucket_window`) before batching, so a batch pads little; the output order then differs from the input order, but
each idx is written once. Data parallel (`shard=(rank, world_size)`, e.g. under torchrun): rank r answers the items
with idx % world_size == r into its own part file `<out stem>.part<r>.jsonl`; at the end (after `barrier`) rank 0
appends the parts' new lines to the output and deletes them. Items in any part count as done, so a killed run of
any world size resumes, and a later run (even single-process) merges left-over parts first.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
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


def read_done(out_path: Path, repair: bool = True) -> set[int]:
    """idx values already answered. A torn last line (a kill mid-write) is cut off, with a warning; with
    `repair=False` (a file another process may be appending to) it is only ignored."""
    if not out_path.exists():
        return set()
    raw = out_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw[: raw.rfind(b"\n") + 1]
        if repair:
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
    path: Path,
    done: set[int],
    errors: Callable[[int, str], None],
    limit: int | None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[QuestionItem]:
    """Parse the question file lazily, skipping answered items, other ranks' items, and reporting bad ones."""
    rank, world_size = shard
    with path.open(encoding="utf-8") as handle:
        for idx, line in enumerate(handle):
            if limit is not None and idx >= limit:
                return
            if idx % world_size != rank or idx in done or not line.strip():
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


def bucketed(
    items: Iterable[QuestionItem], size: int, length_fn: Callable[[QuestionItem], int], window: int
) -> Iterator[list[QuestionItem]]:
    """Batches of similar prompt length: each window of items sorted longest first, then cut into batches."""
    chunk: list[QuestionItem] = []

    def flush() -> Iterator[list[QuestionItem]]:
        chunk.sort(key=length_fn, reverse=True)  # stable: equal lengths keep file order
        yield from batched(iter(chunk), size)
        chunk.clear()

    for item in items:
        chunk.append(item)
        if len(chunk) >= window:
            yield from flush()
    yield from flush()


def prefetched(
    batches: Iterator[list[QuestionItem]], prepare: Callable[[list[QuestionItem]], Any] | None
) -> Iterator[tuple[list[QuestionItem], Any]]:
    """(batch, prepare(batch)) pairs, the next batch prepared in a worker thread while the caller works on this one
    (image slicing and tokenizing on the CPU overlap generation on the GPU). Without `prepare`: (batch, None)."""
    if prepare is None:
        for batch in batches:
            yield batch, None
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        batch = next(batches, None)
        pending = pool.submit(prepare, batch) if batch is not None else None
        while batch is not None:
            following = next(batches, None)
            ready = pending.result()
            pending = pool.submit(prepare, following) if following is not None else None
            yield batch, ready
            batch = following


def part_path(out_path: Path, rank: int) -> Path:
    """Where rank `rank` of a data-parallel run writes its answers before the merge."""
    return out_path.with_name(f"{out_path.stem}.part{rank}.jsonl")


def part_files(out_path: Path) -> list[Path]:
    """Part files of any earlier or running data-parallel run, whatever its world size."""
    return sorted(out_path.parent.glob(f"{out_path.stem}.part[0-9]*.jsonl"))


def merge_parts(out_path: Path) -> int:
    """Append the lines of every part file whose idx is not yet in `out_path`, then delete the parts.

    Safe to interrupt: the output is flushed and synced before a part is deleted, and a re-run skips the idx it
    already holds (a duplicate across parts is written once). Returns the number of lines appended."""
    done = read_done(out_path)
    added = 0
    parts = part_files(out_path)
    with out_path.open("a", encoding="utf-8") as out:
        for part in parts:
            raw = part.read_bytes().decode("utf-8")
            complete = raw[: raw.rfind("\n") + 1]  # a torn last line is the item's crash: it is redone later
            for line in complete.splitlines():
                if not line.strip():
                    continue
                idx = int(json.loads(line)["idx"])
                if idx not in done:
                    out.write(line + "\n")
                    done.add(idx)
                    added += 1
        out.flush()
        os.fsync(out.fileno())
    for part in parts:
        part.unlink()
    return added


def done_items(out_path: Path, own_part: Path | None) -> set[int]:
    """idx answered in the output or in any part file. Only this process's own files are repaired."""
    done = read_done(out_path, repair=own_part is None)
    for part in part_files(out_path):
        done |= read_done(part, repair=part == own_part)
    return done


def generate_answers(
    questions_path: str | Path,
    out_path: str | Path,
    answer_fn: Callable[[list[QuestionItem]], tuple[list[str], int]],
    model_name: str,
    batch_size: int = 1,
    limit: int | None = None,
    length_fn: Callable[[QuestionItem], int] | None = None,
    bucket_window: int = 1024,
    shard: tuple[int, int] = (0, 1),
    barrier: Callable[[], None] | None = None,
) -> AnswerSummary:
    """Run `answer_fn` (a batch of items -> (answers, number of new tokens)) over the questions file.

    `length_fn` (an item's prompt length) turns on length bucketing; `shard=(rank, world_size)` runs this process's
    share into its part file, and `barrier` (called by every rank once its share is done) lets rank 0 merge."""
    from tqdm import tqdm

    rank, world_size = shard
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    questions_path, out_path = Path(questions_path), Path(out_path)
    if not questions_path.is_file():
        raise ValueError(f"--questions: file not found: {questions_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if world_size == 1 and part_files(out_path):
        logger.info("%s: merged %d answers left by an earlier parallel run", out_path, merge_parts(out_path))
    write_path = part_path(out_path, rank) if world_size > 1 else out_path
    done = done_items(out_path, write_path if world_size > 1 else None)
    summary = AnswerSummary(skipped=len(done))
    errors_path = out_path.with_name(out_path.stem + ".errors.jsonl")

    def report_error(idx: int, reason: str) -> None:
        summary.failed += 1
        logger.warning("%s, line %d: %s", questions_path, idx + 1, reason)
        with errors_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"idx": idx, "line": idx + 1, "error": reason}) + "\n")

    items = iter_questions(questions_path, done, report_error, limit, shard)
    if length_fn is not None and batch_size > 1:
        batches = bucketed(items, batch_size, length_fn, max(bucket_window, batch_size))
    else:
        batches = batched(items, batch_size)
    start = time.perf_counter()
    bar_position = rank if world_size > 1 else None
    with (
        write_path.open("a", encoding="utf-8") as out,
        tqdm(
            desc=f"answers[{rank}]" if world_size > 1 else "answers", unit="item", position=bar_position
        ) as bar,
    ):
        for batch, inputs in prefetched(batches, getattr(answer_fn, "prepare", None)):
            answers, n_tokens = answer_fn(batch) if inputs is None else answer_fn(batch, inputs)
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
    if world_size > 1:
        if barrier is not None:
            barrier()
            if rank == 0:
                merge_parts(out_path)
        else:
            logger.warning("no barrier given: parts stay until a later run merges them")
    return summary


def item_conversation(item: QuestionItem) -> list[dict[str, Any]]:
    """The one-turn chat an item is answered with: its image (if any) above its question."""
    content = [item.image, item.question] if item.image is not None else item.question
    return [{"role": "user", "content": content}]


def prompt_length_fn(processor, max_slice_nums: int | None = None) -> Callable[[QuestionItem], int]:
    """An item -> its prompt's token count, from the image size alone (no resizing or slicing of pixels), for
    length bucketing."""
    from mllm.processing.processor import IMAGE_MARKER

    tokenizer, image_processor = processor.tokenizer, processor.image_processor

    def length(item: QuestionItem) -> int:
        prompt, images = processor.prepare_chat_inputs(item_conversation(item))
        for i, image in enumerate(images):
            placeholder = image_processor.get_placeholder(image.size, i, max_slice_nums)
            prompt = prompt.replace(IMAGE_MARKER, placeholder, 1)
        return len(tokenizer.encode(prompt, add_special_tokens=False))

    return length


def model_answer_fn(model, processor, generation_kwargs: dict[str, Any], max_slice_nums: int | None = None):
    """A batch of items -> greedy/sampled/beam answers from an MLLMModel (one generate call per batch).

    The returned function carries `prompt_length` (see `prompt_length_fn`) for `generate_answers(length_fn=...)`,
    and `prepare` (a batch -> processor inputs, CPU work) so that `generate_answers` can build the next batch's
    inputs in a thread while this one generates; `answer(batch, inputs)` then skips the processor."""
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device

    def prepare(batch: list[QuestionItem]) -> dict[str, Any]:
        return processor.chat_batch(
            [item_conversation(item) for item in batch], max_slice_nums=max_slice_nums
        )

    def answer(batch: list[QuestionItem], inputs: dict[str, Any] | None = None) -> tuple[list[str], int]:
        if inputs is None:
            inputs = prepare(batch)
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

    answer.prompt_length = prompt_length_fn(processor, max_slice_nums)
    answer.prepare = prepare
    return answer
