"""Answer generation over an objhal_bench-format question file, resumable and batched.

Input lines: `{"image": <base64 or a path>, "question": ..., "image_id": ..., <any other keys>}` (a string longer
than 1000 characters is base64, as the exercise decides; a shorter one is base64 too when it decodes to an image
file). Output lines, one per item, appended and flushed whole: `{"idx", "question", "answer", "model",
"metainfos", "image_id"}` where `idx` is the item's 0-based line number and `metainfos` holds every other input key.

The output is a `mllm.io.ResumableJsonl`: items already in it are skipped, so a killed run resumes where it
stopped; a run with another questions file, model or decoding settings is refused (its fingerprint differs) unless
`--overwrite`; a second run on the same output is refused while the first holds its lock. Every bad record (a line
that is not UTF-8 or not JSON, a missing field, an unreadable image, a decompression bomb or an image over the
pixel cap, a prompt with control tokens or literal image tags, a prompt longer than the model's positions) goes,
once, with its file, line and field, to `<out stem>.errors.jsonl`, and the run goes on.

At scale: with a `length_fn` the pending items are sorted by prompt length (longest first, in windows of
`bucket_window`) before batching, so a batch pads little; the output order then differs from the input order, but
each idx is written once. Data parallel (`shard=(rank, world_size)`, e.g. under torchrun): rank r answers the items
with idx % world_size == r into its own part file `<out stem>.part<r>.jsonl`; at the end (after `barrier`) rank 0
appends the parts' new lines to the output and deletes them. Items in any part count as done, so a killed run of
any world size resumes, and a later run (even single-process) merges left-over parts first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mllm.io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    RecordError,
    ResumableJsonl,
    file_fingerprint,
    image_source,
    iter_jsonl,
    open_image,
    run_isolated,
)
from mllm.model.chat import model_max_length
from mllm.vlm import VLMBatch, as_vlm
from mllm.vlm.minicpmv import MiniCPMVVLM

logger = logging.getLogger(__name__)

RESERVED_KEYS = ("image", "question", "image_id", "image_path")


@dataclass
class QuestionItem:
    idx: int
    question: str
    image: Image.Image | None
    image_id: Any
    metainfos: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None
    """The prompt's length, once a check measured it (used for length bucketing)."""


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


def parse_question(
    record: Any, idx: int, base_dir: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> QuestionItem:
    """One objhal_bench record -> a QuestionItem with its decoded image; RecordError naming the field otherwise."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RecordError("field 'question' is missing or empty", "question")
    name = "image" if "image" in record else "image_path"
    image_value = record.get(name)
    image = None
    if image_value is not None:
        if not isinstance(image_value, str):
            raise RecordError(f"field '{name}' must be a base64 string or a path", name)
        image = open_image(image_source(image_value, base_dir, name), f"field '{name}'", max_pixels, name)
    metainfos = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
    return QuestionItem(idx, question, image, record.get("image_id"), metainfos)


def iter_questions(
    path: Path,
    done: set[int],
    errors: Callable[[int, RecordError], None],
    limit: int | None,
    shard: tuple[int, int] = (0, 1),
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[QuestionItem]:
    """Parse the question file lazily, skipping answered items and other ranks' items, and reporting bad ones (a
    line that is not UTF-8, not JSON, lacks a field or has an unusable image) without stopping."""
    rank, world_size = shard
    for idx, record in iter_jsonl(path):
        if limit is not None and idx >= limit:
            return
        if idx % world_size != rank or idx in done or record is None:
            continue
        try:
            if isinstance(record, RecordError):
                raise record
            yield parse_question(record, idx, path.parent, max_pixels)
        except RecordError as exc:
            errors(idx, exc)


def checked(
    items: Iterable[QuestionItem],
    check: Callable[[QuestionItem], Any] | None,
    errors: Callable[[int, RecordError], None],
) -> Iterator[QuestionItem]:
    """The items that pass `check` (e.g. the prompt fits the model); the others are reported as bad records."""
    for item in items:
        if check is not None:
            try:
                item.prompt_tokens = check(item)
            except RecordError as exc:
                errors(item.idx, exc)
                continue
        yield item


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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        batch = next(batches, None)
        pending = pool.submit(prepare, batch) if batch is not None else None
        while batch is not None:
            following = next(batches, None)
            ready = pending.result()
            pending = pool.submit(prepare, following) if following is not None else None
            yield batch, ready
            batch = following


def answer_records(batch: list[QuestionItem], answers: list[str], model_name: str) -> list[dict[str, Any]]:
    return [
        {
            "idx": item.idx,
            "question": item.question,
            "answer": answer,
            "model": model_name,
            "metainfos": item.metainfos,
            "image_id": item.image_id,
        }
        for item, answer in zip(batch, answers, strict=True)
    ]


def answer_batch(
    answer_fn: Callable[..., tuple[list[str], int]],
    batch: list[QuestionItem],
    inputs: Any,
    errors: Callable[[int, RecordError], None],
) -> tuple[list[QuestionItem], list[str], int]:
    """(items answered, their answers, new tokens) of one batch with its prepared `inputs` (or a RecordError from
    preparing them). A batch that fails on a bad record is answered again one item at a time
    (`mllm.io.run_isolated`), so that only the bad items are reported and the others are answered."""
    if not isinstance(inputs, RecordError) and inputs is not None:
        try:
            answers, n_tokens = answer_fn(batch, inputs)
            return batch, answers, n_tokens
        except RecordError:
            pass  # found again below, item by item
    kept, texts, total = [], [], 0
    for items, (answers, n_tokens) in run_isolated(answer_fn, batch, lambda item, exc: errors(item.idx, exc)):
        kept += items
        texts += answers
        total += n_tokens
    return kept, texts, total


def _catching(prepare: Callable[[list[QuestionItem]], Any] | None):
    """`prepare` that returns a RecordError instead of raising it (it runs in the prefetch thread)."""
    if prepare is None:
        return None

    def run(batch: list[QuestionItem]) -> Any:
        try:
            return prepare(batch)
        except RecordError as exc:
            return exc

    return run


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
    fingerprint: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> AnswerSummary:
    """Run `answer_fn` (a batch of items -> (answers, number of new tokens)) over the questions file.

    The output is a `mllm.io.ResumableJsonl`: its fingerprint is the questions file's content, `model_name` and
    whatever `fingerprint` adds (the CLI adds the model directory's files and the decoding settings), so a re-run
    with other inputs is refused unless `overwrite`. An `answer_fn.check` (an item -> its prompt length, or a
    RecordError) is run on every item first. `length_fn` (an item's prompt length) turns on length bucketing;
    `shard=(rank, world_size)` runs this process's share into its part file, and `barrier` (called by every rank
    at the start and once its share is done) lets rank 0 record the fingerprint first and merge at the end."""
    rank, world_size = shard
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    questions_path, out_path = Path(questions_path), Path(out_path)
    if not questions_path.is_file():
        raise ValueError(f"--questions: file not found: {questions_path}")
    prints = {"questions": file_fingerprint(questions_path), "model_name": model_name, **(fingerprint or {})}
    output = ResumableJsonl(
        out_path, prints, overwrite=overwrite, rank=rank, world_size=world_size, barrier=barrier
    )
    with output:
        if world_size == 1 and output.part_files():
            logger.info("%s: merged %d answers left by a parallel run", out_path, output.merge_parts())
        summary = AnswerSummary(skipped=len(output.done))

        def report_error(idx: int, exc: RecordError) -> None:
            summary.failed += 1
            output.error(idx, str(exc), source=questions_path, line=idx + 1, field=exc.field)

        items = iter_questions(questions_path, output.done, report_error, limit, shard, max_image_pixels)
        items = checked(items, getattr(answer_fn, "check", None), report_error)
        if length_fn is not None and batch_size > 1:
            batches = bucketed(items, batch_size, length_fn, max(bucket_window, batch_size))
        else:
            batches = batched(items, batch_size)
        start = time.perf_counter()
        with tqdm(
            desc=f"answers[{rank}]" if world_size > 1 else "answers",
            unit="item",
            position=rank if world_size > 1 else None,
        ) as bar:
            for batch, inputs in prefetched(batches, _catching(getattr(answer_fn, "prepare", None))):
                kept, answers, n_tokens = answer_batch(answer_fn, batch, inputs, report_error)
                output.append(answer_records(kept, answers, model_name))
                summary.succeeded += len(kept)
                summary.new_tokens += n_tokens
                summary.seconds = time.perf_counter() - start
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{summary.new_tokens / max(summary.seconds, 1e-9):.1f}")
        summary.seconds = time.perf_counter() - start
        if world_size > 1:
            if rank != 0:
                output.close()  # this rank's part is complete: rank 0 may merge it
            if barrier is not None:
                barrier()
                if rank == 0:
                    output.merge_parts()  # still holding the output's lock
            else:
                logger.warning("no barrier given: parts stay until a later run merges them")
    return summary


def item_conversation(item: QuestionItem) -> list[dict[str, Any]]:
    """The one-turn chat an item is answered with: its image (if any) above its question."""
    content = [item.image, item.question] if item.image is not None else item.question
    return [{"role": "user", "content": content}]


def prompt_check_fn(processor, max_length: int | None = None) -> Callable[[QuestionItem], int]:
    """An item -> its prompt's token count, from the image size alone (no resizing or slicing of pixels); a
    RecordError for a prompt the processor would refuse (control tokens, literal image tags, over `max_length`)."""

    def check(item: QuestionItem) -> int:
        if item.prompt_tokens is not None:
            return item.prompt_tokens
        try:
            return processor.check_prompt(item_conversation(item), max_length=max_length)
        except RecordError:
            raise
        except ValueError as exc:
            raise RecordError(str(exc), "question") from exc

    return check


def model_answer_fn(model, processor, generation_kwargs: dict[str, Any], max_length: int | None = None):
    """A batch of items -> answers (greedy, sampled or beam: `generation_kwargs`, one of our decoding presets) from
    one `generate` call of any model family that `mllm.load` returns (`mllm.vlm.as_vlm`).

    The returned function carries `prepare` (a batch -> model inputs, CPU work), so that `generate_answers` can
    build the next batch's inputs in a thread while this one generates (`answer(batch, inputs)` then skips the
    processor); a prompt the processor refuses is a RecordError. For MiniCPM-V it also carries `check` and
    `prompt_length` (`prompt_check_fn`; `max_length` defaults to the model's positions, as on the web page)."""
    vlm = as_vlm(model, processor)
    minicpmv = isinstance(vlm, MiniCPMVVLM)
    if generation_kwargs.get("fast") and not minicpmv:
        raise ValueError("--fast-generate is the MiniCPM-V decoding path; leave it out for this model family")

    def prepare(batch: list[QuestionItem]) -> VLMBatch:
        try:
            return vlm.prepare([item_conversation(item) for item in batch])
        except ValueError as exc:
            raise RecordError(str(exc)) from exc

    def answer(batch: list[QuestionItem], inputs: VLMBatch | None = None) -> tuple[list[str], int]:
        tokens = vlm.generate_tokens(inputs if inputs is not None else prepare(batch), **generation_kwargs)
        return vlm.decode(tokens), vlm.count_generated(tokens)

    answer.prepare = prepare
    if minicpmv:
        answer.check = prompt_check_fn(processor, max_length or model_max_length(model))
        answer.prompt_length = answer.check
    return answer
