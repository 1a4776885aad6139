"""Model-driven grounding evaluation: batched greedy answers on Shikra REC jsonl files, resumable, then scored.

For every data file (`{"img_path", "expression", "bbox": [x0, y0, x1, y1] pixels, "width"?, "height"?}` per line)
the model is asked the exercise's prompt ("Where is {expr} in image? answer in [x0,y0,x1,y1] format.") and each
answer goes, as one appended and flushed line, to `<out_dir>/<data stem>.predictions.jsonl`:
`{"idx", "split", "img_path", "expression", "bbox", "width", "height", "question", "answer", "model"}`. Lines already
there are skipped, so a killed run resumes where it stopped (the file is a `mllm.io.ResumableJsonl`: fingerprinted,
locked, a torn last line cut off). Unusable lines (not UTF-8 or JSON, missing image, bad bbox, an image over the
pixel cap) go to `<stem>.predictions.errors.jsonl` and the run goes on. The predictions are then scored by `mllm.eval.grounding_score.score_predictions`: `summary.md` (the
table), `summary.json` (per split and overall, with the unparsable answers) and `--vis N` pictures under `vis/`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mllm.boxes import BOX_FORMATS, parse_box, to_pixels
from mllm.eval.answer import QuestionItem, answer_batch, batched, checked
from mllm.eval.grounding_score import (
    markdown_table,
    score_predictions,
    split_name_from_path,
    summarize,
    visualize_items,
)
from mllm.io import (
    DEFAULT_MAX_IMAGE_PIXELS,
    RecordError,
    ResumableJsonl,
    file_fingerprint,
    iter_jsonl,
    open_image,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Where is {expr} in image? answer in [x0,y0,x1,y1] format."
PREDICTIONS_SUFFIX = ".predictions.jsonl"

AnswerFn = Callable[[list[QuestionItem]], tuple[list[str], int]]
"""A batch of items (image + question) -> (answers, number of new tokens); see `mllm.eval.answer.model_answer_fn`."""


@dataclass
class GroundingEvalConfig:
    """What `mllm eval grounding` evaluates and where it writes."""

    data: list[Path]
    """Shikra REC jsonl files, one per split (the split name comes from the file name)."""
    out_dir: Path
    """Folder of the predictions files, summary.md, summary.json and vis/."""
    image_root: Path | None = None
    """Folder that `img_path` is relative to (default: each data file's folder)."""
    prompt: str = DEFAULT_PROMPT
    """Question template; `{expr}` is replaced by the expression."""
    batch_size: int = 8
    """Prompts per generate call."""
    max_new_tokens: int = 64
    """Longest answer in tokens (a box is about 20)."""
    limit: int | None = None
    """Only the first N lines of each data file."""
    vis: int = 0
    """Pictures to draw in all (spread over the splits)."""
    box_format: str = "auto"
    """How answers write boxes: auto, mllm (0..1000), qwen, shikra (see mllm.boxes)."""
    overwrite: bool = False
    """Start a predictions file afresh when it was made with other inputs or settings (refused otherwise)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Images over this many pixels (and decompression bombs) are bad records."""

    def validate(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one REC jsonl file")
        for path in self.data:
            if not Path(path).is_file():
                raise ValueError(f"--data: file not found: {path}")
        stems = [prediction_path(self.out_dir, p).name for p in self.data]
        if len(set(stems)) != len(stems):
            raise ValueError(f"--data: two files would share a predictions file ({stems})")
        if "{expr}" not in self.prompt:
            raise ValueError(f"--prompt must contain {{expr}}, got {self.prompt!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.vis < 0:
            raise ValueError(f"--vis must not be negative, got {self.vis}")
        if self.box_format not in BOX_FORMATS:
            raise ValueError(f"--box-format must be one of {BOX_FORMATS}, got {self.box_format!r}")


@dataclass
class SplitRun:
    """Counts of one data file's generation pass."""

    data: str
    predictions: str
    answered: int = 0
    skipped: int = 0
    failed: int = 0
    new_tokens: int = 0
    seconds: float = 0.0


@dataclass
class GroundingEvalResult:
    """What a run produced: per data file counts, the scored summary and the files written."""

    runs: list[SplitRun] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    table: str = ""
    pictures: list[Path] = field(default_factory=list)


def prediction_path(out_dir: Path, data_path: Path) -> Path:
    """`refcoco_val.jsonl` -> `<out_dir>/refcoco_val.predictions.jsonl`."""
    name = Path(data_path).name
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else Path(name).stem
    return Path(out_dir) / f"{stem}{PREDICTIONS_SUFFIX}"


def _pixel_box(value: Any) -> list[float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise RecordError(f"field 'bbox': expected [x0, y0, x1, y1] in pixels, got {value!r}", "bbox")
    return [float(v) for v in value]


def parse_rec_record(
    record: Any, idx: int, image_root: Path, prompt: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> QuestionItem:
    """One REC record -> a QuestionItem whose metainfos keep what the predictions line needs; RecordError naming
    the field otherwise."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    expression = record.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        raise RecordError("field 'expression' is missing or empty", "expression")
    bbox = _pixel_box(record.get("bbox"))
    img_path = record.get("img_path") or record.get("image")
    if not isinstance(img_path, str) or not img_path:
        raise RecordError("field 'img_path' is missing", "img_path")
    path = Path(img_path) if Path(img_path).is_absolute() else image_root / img_path
    if not path.is_file():
        raise RecordError(f"field 'img_path': image not found: {path}", "img_path")
    image = open_image(path, f"field 'img_path' ({path})", max_pixels, "img_path")
    width, height = record.get("width") or image.size[0], record.get("height") or image.size[1]
    meta = {"img_path": img_path, "expression": expression, "bbox": bbox, "width": width, "height": height}
    return QuestionItem(idx, prompt.format(expr=expression), image, None, meta)


def iter_rec(
    path: Path,
    image_root: Path,
    prompt: str,
    done: set[int],
    errors: Callable[[int, RecordError], None],
    limit: int | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[QuestionItem]:
    """Lazily parse a REC file, skipping answered lines and reporting unusable ones (not UTF-8, not JSON, a bad
    field or image) without stopping."""
    for idx, record in iter_jsonl(path):
        if limit is not None and idx >= limit:
            return
        if idx in done or record is None:
            continue
        try:
            if isinstance(record, RecordError):
                raise record
            yield parse_rec_record(record, idx, image_root, prompt, max_pixels)
        except RecordError as exc:
            errors(idx, exc)


def generate_split(
    data_path: Path,
    out_path: Path,
    answer_fn: AnswerFn,
    model_name: str,
    config: GroundingEvalConfig,
    fingerprint: dict[str, Any] | None = None,
) -> SplitRun:
    """Answer every not-yet-answered line of one REC file into a `mllm.io.ResumableJsonl` (its fingerprint: the
    data file, the model, the prompt and `fingerprint`), one flushed line per answer; bad lines go to its errors
    file."""
    prints = {
        "data": file_fingerprint(data_path),
        "model_name": model_name,
        "prompt": config.prompt,
        "max_new_tokens": config.max_new_tokens,
        **(fingerprint or {}),
    }
    output = ResumableJsonl(out_path, prints, overwrite=config.overwrite, what="predictions")
    with output:
        run = SplitRun(str(data_path), str(out_path), skipped=len(output.done))
        split = split_name_from_path(data_path)
        image_root = config.image_root if config.image_root is not None else data_path.parent

        def report_error(idx: int, exc: RecordError) -> None:
            run.failed += 1
            output.error(idx, str(exc), source=data_path, line=idx + 1, field=exc.field)

        start = time.perf_counter()
        items = iter_rec(
            data_path,
            image_root,
            config.prompt,
            output.done,
            report_error,
            config.limit,
            config.max_image_pixels,
        )
        items = checked(items, getattr(answer_fn, "check", None), report_error)
        with tqdm(desc=split, unit="expr") as bar:
            for batch in batched(items, config.batch_size):
                kept, answers, n_tokens = answer_batch(answer_fn, batch, None, report_error)
                records = []
                for item, answer in zip(kept, answers, strict=True):
                    record = {"idx": item.idx, "split": split, **item.metainfos}
                    record.update(question=item.question, answer=answer, model=model_name)
                    records.append(record)
                output.append(records)
                run.answered += len(kept)
                run.new_tokens += n_tokens
                bar.update(len(batch))
        run.seconds = time.perf_counter() - start
    return run


def spread(items: list[dict], count: int) -> list[dict]:
    """Up to `count` items taken round-robin over the splits (so every split gets pictures)."""
    by_split: dict[str, list[dict]] = {}
    for item in items:
        by_split.setdefault(item["split"], []).append(item)
    chosen: list[dict] = []
    rank = 0
    while len(chosen) < count and any(rank < len(group) for group in by_split.values()):
        chosen.extend(group[rank] for group in by_split.values() if rank < len(group))
        rank += 1
    return chosen[:count]


def score_and_report(
    predictions: list[tuple[Path, Path | None]],
    config: GroundingEvalConfig,
    runs: list[SplitRun] | None = None,
) -> GroundingEvalResult:
    """Score (predictions file, image root) pairs together, write summary.md / summary.json and the pictures into
    config.out_dir (rewritten from the predictions on every run, atomically)."""
    items: list[dict] = []
    for path, image_root in predictions:
        if path.is_file() and path.stat().st_size > 0:
            items.extend(score_predictions(path, config.box_format, image_root=image_root)["items"])
    if not items:
        raise ValueError(
            f"no predictions to score in {config.out_dir} (did every line fail? see *.errors.jsonl)"
        )
    summary = summarize(items)
    table = markdown_table(summary)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in summary.items() if k != "items"}
    public["runs"] = [asdict(r) for r in runs or []]
    public["failed_lines"] = sum(r.failed for r in runs or [])
    write_text_atomic(out_dir / "summary.json", json.dumps(public, indent=2) + "\n")
    write_text_atomic(out_dir / "summary.md", table + "\n")
    pictures: list[Path] = []
    if config.vis:
        pictures = visualize_items(spread(summary["items"], config.vis), out_dir / "vis")
    return GroundingEvalResult(runs or [], public, table, pictures)


def evaluate_grounding(
    config: GroundingEvalConfig,
    answer_fn: AnswerFn,
    model_name: str,
    fingerprint: dict[str, Any] | None = None,
) -> GroundingEvalResult:
    """Generate (resuming) the predictions of every data file, then score them all and draw the pictures."""
    config.validate()
    runs, predictions = [], []
    for data_path in map(Path, config.data):
        out_path = prediction_path(config.out_dir, data_path)
        runs.append(generate_split(data_path, out_path, answer_fn, model_name, config, fingerprint))
        predictions.append((out_path, config.image_root or data_path.parent))
    return score_and_report(predictions, config, runs)


def ground_one(
    answer_fn: AnswerFn,
    image: Image.Image,
    expression: str,
    prompt: str = DEFAULT_PROMPT,
    box_format: str = "auto",
):
    """One image + expression -> (answer text, pixel box or None)."""
    if "{expr}" not in prompt:
        raise ValueError(f"--prompt must contain {{expr}}, got {prompt!r}")
    item = QuestionItem(0, prompt.format(expr=expression), image.convert("RGB"), None)
    check = getattr(answer_fn, "check", None)
    if check is not None:
        check(item)  # a RecordError (a ValueError) names what is wrong with the expression
    (answer,), _ = answer_fn([item])
    box = parse_box(answer, box_format, image.size)
    return answer, None if box is None else to_pixels(box, *image.size)
