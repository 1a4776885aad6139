"""`mllm prepare-grounding`: Shikra-format grounding files -> SFT-format conversations.

Three tasks, each from its own files and templates:

- REC (referring-expression comprehension): user asks where `<expr>` is, the assistant answers with its box.
- GC (grounded captioning): user gives a box (`<objs>` / `<boxes>`), the assistant answers with the expression.
- Flickr30k entities (phrase grounding): the assistant writes the caption with the box(es) after each phrase.

Boxes are written with `mllm.boxes` (one convention for the whole project). Each output item is
`{"id", "image", "conversations": [{"role": "user", "content": "<image>\\n..."}, {"role": "assistant", ...}]}`
with `image` an absolute path, so the file can be mixed with other data and used from any working directory.
Templates are drawn with a per-task RNG seeded from `seed`, so the output is the same for the same inputs.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mllm.boxes import OUTPUT_BOX_FORMATS, format_boxes, snap_box, wrap_ref
from mllm.io import open_image_header, write_text_atomic

logger = logging.getLogger(__name__)

PLACEHOLDERS = ("<image>", "<expr>", "<boxes>", "<objs>", "<question>")
DEFAULT_TEMPLATES = {
    "rec": ["<image> Where is <expr> in image? answer in [x0,y0,x1,y1] format."],
    "gc": ["<image> Describe the region <objs> in the image briefly."],
    "flickr": ["<image> Describe the image and give the box [x0,y0,x1,y1] of each object you mention."],
}
# placeholders a task's templates must contain (one of), and those it cannot fill
_REQUIRED = {"rec": ("<expr>",), "gc": ("<objs>", "<boxes>"), "flickr": ()}
_FORBIDDEN = {
    "rec": ("<objs>", "<boxes>", "<question>"),
    "gc": ("<expr>", "<question>"),
    "flickr": ("<expr>", "<objs>", "<boxes>", "<question>"),
}
_PHRASE_RE = re.compile(r"<ph_st>(.*?)<ph_ed>", re.DOTALL)


@dataclass
class GroundingPrepConfig:
    """Inputs and options of one preparation run."""

    out: Path
    """Output SFT-format JSON file (a list of conversations)."""
    rec_files: list[Path] = field(default_factory=list)
    """Shikra REC jsonl files (`img_path`, `expression`, `bbox` in pixels, optional `height`/`width`)."""
    gc_files: list[Path] = field(default_factory=list)
    """Shikra GC jsonl files (same fields as REC); the box is given, the expression is the answer."""
    flickr_files: list[Path] = field(default_factory=list)
    """Flickr30k-entities jsonl files (`image_id`, `sentence` with <ph_st>..<ph_ed>, `boxes`, `boxes_seq`)."""
    rec_templates: Path | None = None
    """JSON list of REC prompt templates (must contain <expr>); default: the evaluation prompt."""
    gc_templates: Path | None = None
    """JSON list of GC prompt templates (must contain <objs> or <boxes>)."""
    flickr_templates: Path | None = None
    """JSON list of phrase-grounding prompt templates."""
    image_root: Path | None = None
    """Folder the images' relative paths start from; default: the folder of the jsonl file."""
    seed: int = 0
    """Seed of the template draws and of the SFT mixing sample."""
    mix_sft: Path | None = None
    """Optional general SFT-format JSON file to mix in."""
    mix_ratio: float = 0.0
    """General SFT items per grounding item (0.5: one SFT item for every two grounding items)."""
    mix_image_folder: Path | None = None
    """Folder the mixed SFT file's relative image paths start from; default: that file's folder."""
    box_format: str = "mllm"
    """Syntax of the boxes written into the conversations, one of `mllm.boxes.OUTPUT_BOX_FORMATS`: ours (mllm),
    Qwen-VL's (qwen), Shikra's, or a target family's (llava, qwen2vl, qwen25vl)."""
    box_bins: int = 0
    """Snap every box written to the nearest of this many equal steps of the image side (`mllm.boxes.snap_box`; 20:
    the mllm format's values become multiples of 50); 0 writes them as they are. Coarser targets are faster to learn
    (the toy demo's REC: Acc@0.5 26.5% against 19.75% after the same 1,200 steps, docs/LOG.md 2026-12-05 (fifth
    session)) at the cost of precision on small objects."""
    ref_tags: bool = False
    """Wrap expressions and phrases as <ref>...</ref> (Qwen2-VL's object_ref tags for qwen2vl / qwen25vl; off: the
    prompt matches the evaluation prompt)."""
    overwrite: bool = False
    """Replace an existing output file."""


@dataclass
class GroundingPrepStats:
    """What a run produced and what it had to drop; printed by the CLI."""

    items: dict[str, int] = field(default_factory=lambda: {"rec": 0, "gc": 0, "flickr": 0, "sft": 0})
    clamped_boxes: int = 0
    empty_boxes: int = 0
    skipped_records: int = 0
    missing_images: list[str] = field(default_factory=list)


@dataclass
class _Context:
    """Per-run state: the image-size cache and the counters, passed explicitly instead of globals."""

    config: GroundingPrepConfig
    stats: GroundingPrepStats
    exists: dict[str, bool] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def _bad(path: Path, lineno: int, name: str, reason: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}, field '{name}': {reason}")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line; a line that is not a JSON object raises ValueError."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def load_templates(path: Path | None, task: str) -> list[str]:
    """A task's templates from a JSON list of strings (or the built-in default), checked for placeholders."""
    if path is None:
        return list(DEFAULT_TEMPLATES[task])
    try:
        templates = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"template file {path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"template file {path}: expected a non-empty JSON list of strings")
    for i, template in enumerate(templates):
        if not isinstance(template, str):
            raise ValueError(
                f"template file {path}, entry {i}: expected a string, got {type(template).__name__}"
            )
        required = _REQUIRED[task]
        if required and not any(p in template for p in required):
            raise ValueError(
                f"template file {path}, entry {i}: a {task} template needs {' or '.join(required)}"
            )
        for placeholder in _FORBIDDEN[task]:
            if placeholder in template:
                raise ValueError(
                    f"template file {path}, entry {i}: {placeholder} cannot be filled for {task}"
                )
    return templates


def fill_template(template: str, values: dict[str, str]) -> str:
    """Fill placeholders and move the image marker to the front as `<image>\\n` (the SFT format's layout)."""
    text = template
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    text = re.sub(r"\s*<image>\s*", " ", text).strip()
    text = re.sub(r"\s+([,.?!:;])", r"\1", text)  # "the image <image>, where" -> "the image, where"
    return "<image>\n" + text


def _conversation(item_id: str, image: Path, user: str, assistant: str) -> dict:
    return {
        "id": item_id,
        "image": str(image),
        "conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
    }


def _resolve_image(ctx: _Context, data_file: Path, relative: str) -> Path:
    root = ctx.config.image_root if ctx.config.image_root is not None else data_file.parent
    return (Path(root) / relative).resolve()


def _image_size(ctx: _Context, image: Path, record: dict, where: str) -> tuple[float, float] | None:
    """(width, height) from the record when it has both, else from the image header (read once per image, without
    decoding pixels); None when the image file is missing (recorded once per image)."""
    key = str(image)
    if key not in ctx.exists:
        ctx.exists[key] = image.is_file()
        if not ctx.exists[key]:
            ctx.stats.missing_images.append(key)
    if not ctx.exists[key]:
        return None
    width, height = record.get("width"), record.get("height")
    if width is not None and height is not None:
        return float(width), float(height)
    if key not in ctx.sizes:
        with open_image_header(image, f"{where}: image {image}") as img:  # RecordError: a ValueError
            ctx.sizes[key] = img.size
    return ctx.sizes[key]


def _check_box(path: Path, lineno: int, name: str, box: object) -> list[float]:
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise _bad(path, lineno, name, f"expected [x1, y1, x2, y2] in pixels, got {box!r}")
    return [float(v) for v in box]


def _check_size_fields(path: Path, lineno: int, record: dict) -> None:
    for name in ("width", "height"):
        value = record.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise _bad(path, lineno, name, f"expected a positive number, got {value!r}")


def clamp_box(ctx: _Context, box: Sequence[float], width: float, height: float) -> list[float] | None:
    """Clamp a pixel box to the image (counted); None for a box without area (counted as empty)."""
    x0, y0, x1, y1 = box
    clamped = [
        min(max(x0, 0.0), width),
        min(max(y0, 0.0), height),
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
    ]
    if clamped != list(box):
        ctx.stats.clamped_boxes += 1
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        ctx.stats.empty_boxes += 1
        return None
    return clamped


def _snapped(config: GroundingPrepConfig, box: list[float], size: tuple[float, float]) -> list[float]:
    """`box` snapped to `config.box_bins` steps of the image (unchanged when 0)."""
    return snap_box(box, size[0], size[1], config.box_bins) if config.box_bins else box


def _string_field(path: Path, lineno: int, record: dict, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, lineno, name, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _region_items(ctx: _Context, path: Path, task: str, templates: list[str]) -> list[dict]:
    """REC or GC items of one Shikra jsonl file."""
    rng = random.Random(f"{ctx.config.seed}:{task}:{path.name}")
    items = []
    for lineno, record in read_jsonl(path):
        img_path = _string_field(path, lineno, record, "img_path")
        expression = _string_field(path, lineno, record, "expression")
        bbox = _check_box(path, lineno, "bbox", record.get("bbox"))
        _check_size_fields(path, lineno, record)
        template = rng.choice(templates)  # drawn for every record so skips do not shift later draws
        image = _resolve_image(ctx, path, img_path)
        size = _image_size(ctx, image, record, f"{path}, line {lineno}")
        box = clamp_box(ctx, bbox, *size) if size is not None else None
        if box is None:
            ctx.stats.skipped_records += 1
            continue
        box_text = format_boxes([_snapped(ctx.config, box, size)], size[0], size[1], ctx.config.box_format)
        expr_text = wrap_ref(expression, ctx.config.box_format) if ctx.config.ref_tags else expression
        if task == "rec":
            user, answer = fill_template(template, {"<expr>": expr_text}), box_text
        else:
            user, answer = fill_template(template, {"<objs>": box_text, "<boxes>": box_text}), expression
        items.append(_conversation(f"{task}:{path.stem}:{lineno}", image, user, answer))
    return items


def _check_flickr(path: Path, lineno: int, record: dict) -> tuple[str, list[list[float]], list[list[int]]]:
    sentence = _string_field(path, lineno, record, "sentence")
    boxes = record.get("boxes")
    if not isinstance(boxes, list):
        raise _bad(path, lineno, "boxes", f"expected a list of boxes, got {boxes!r}")
    boxes = [_check_box(path, lineno, f"boxes[{i}]", b) for i, b in enumerate(boxes)]
    seq = record.get("boxes_seq")
    if not isinstance(seq, list) or not all(isinstance(s, list) for s in seq):
        raise _bad(path, lineno, "boxes_seq", f"expected a list of lists of box indices, got {seq!r}")
    for indices in seq:
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(boxes):
                raise _bad(path, lineno, "boxes_seq", f"box index {index!r} is not in 0..{len(boxes) - 1}")
    n_phrases = len(_PHRASE_RE.findall(sentence))
    if (
        n_phrases != len(seq)
        or sentence.count("<ph_st>") != n_phrases
        or sentence.count("<ph_ed>") != n_phrases
    ):
        raise _bad(
            path,
            lineno,
            "sentence",
            f"{n_phrases} <ph_st>..<ph_ed> phrases but boxes_seq has {len(seq)} entries",
        )
    return sentence, boxes, seq


def _grounded_caption(
    config: GroundingPrepConfig,
    sentence: str,
    seq: list[list[int]],
    kept: list[list[float] | None],
    size: tuple[float, float],
) -> str:
    """Replace each `<ph_st>phrase<ph_ed>` by the phrase followed by its surviving boxes (dropped boxes omitted)."""
    phrase_boxes = iter(seq)

    def render(match: re.Match) -> str:
        phrase = match.group(1).strip()
        boxes = [kept[i] for i in next(phrase_boxes) if kept[i] is not None]
        text = wrap_ref(phrase, config.box_format) if config.ref_tags else phrase
        if not boxes:
            return text
        boxes = [_snapped(config, box, size) for box in boxes]
        return f"{text} {format_boxes(boxes, size[0], size[1], config.box_format)}"

    return _PHRASE_RE.sub(render, sentence)


def _flickr_items(ctx: _Context, path: Path, templates: list[str]) -> list[dict]:
    """Phrase-grounding items: the caption with the box(es) written after each marked phrase."""
    rng = random.Random(f"{ctx.config.seed}:flickr:{path.name}")
    items = []
    for lineno, record in read_jsonl(path):
        image_id = record.get("image_id")
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)) or str(image_id) == "":
            raise _bad(path, lineno, "image_id", f"expected an image id, got {image_id!r}")
        sentence, boxes, seq = _check_flickr(path, lineno, record)
        _check_size_fields(path, lineno, record)
        template = rng.choice(templates)
        name = str(image_id) if Path(str(image_id)).suffix else f"{image_id}.jpg"
        image = _resolve_image(ctx, path, name)
        size = _image_size(ctx, image, record, f"{path}, line {lineno}")
        if size is None:
            ctx.stats.skipped_records += 1
            continue
        kept = [clamp_box(ctx, b, *size) for b in boxes]
        caption = _grounded_caption(ctx.config, sentence, seq, kept, size)
        items.append(
            _conversation(f"flickr:{path.stem}:{lineno}", image, fill_template(template, {}), caption)
        )
    return items


def _resolve_sft_images(item: dict, folder: Path, where: str) -> dict:
    image = item.get("image")
    out = dict(item)
    if isinstance(image, str):
        out["image"] = str((folder / image).resolve())
    elif isinstance(image, dict):
        out["image"] = {k: str((folder / v).resolve()) for k, v in image.items()}
    elif image is not None:
        raise ValueError(f"{where}, field 'image': expected a path or a dict of paths, got {image!r}")
    return out


def mix_sft_items(config: GroundingPrepConfig, n_grounding: int) -> list[dict]:
    """round(mix_ratio * n_grounding) items of the general SFT file, sampled without replacement while it lasts.

    When more items are asked for than the file holds, it is repeated in shuffled passes (and a warning logged);
    repeats get an `:r<k>` id suffix so ids stay unique.
    """
    assert config.mix_sft is not None
    data = json.loads(Path(config.mix_sft).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"--mix-sft {config.mix_sft}: expected a non-empty JSON list of conversations")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            raise ValueError(f"--mix-sft {config.mix_sft}, item {i}, field 'conversations': expected a list")
    wanted = round(config.mix_ratio * n_grounding)
    if wanted > len(data):
        logger.warning(
            "--mix-ratio asks for %d SFT items but %s has %d: repeating it", wanted, config.mix_sft, len(data)
        )
    rng = random.Random(f"{config.seed}:mix")
    folder = (
        Path(config.mix_image_folder) if config.mix_image_folder is not None else Path(config.mix_sft).parent
    )
    items: list[dict] = []
    repeat = 0
    while len(items) < wanted:
        order = rng.sample(range(len(data)), len(data))[: wanted - len(items)]
        for i in order:
            item = _resolve_sft_images(data[i], folder, f"--mix-sft {config.mix_sft}, item {i}")
            suffix = f":r{repeat}" if repeat else ""
            item["id"] = f"sft:{data[i].get('id', i)}{suffix}"
            items.append(item)
        repeat += 1
    return items


def build_grounding_items(config: GroundingPrepConfig) -> tuple[list[dict], GroundingPrepStats]:
    """All conversations of a run (grounding items in input order, then mixed SFT items) and the counters."""
    if config.box_format not in OUTPUT_BOX_FORMATS:
        raise ValueError(f"--box-format {config.box_format!r}: choose one of {', '.join(OUTPUT_BOX_FORMATS)}")
    if config.mix_ratio < 0:
        raise ValueError(f"--mix-ratio must be >= 0, got {config.mix_ratio}")
    if config.box_bins < 0:
        raise ValueError(f"--box-bins must be >= 0 (0: boxes as they are), got {config.box_bins}")
    if not (config.rec_files or config.gc_files or config.flickr_files):
        raise ValueError("no input: give at least one of --rec, --gc, --flickr")
    ctx = _Context(config=config, stats=GroundingPrepStats())
    items: list[dict] = []
    rec_templates = load_templates(config.rec_templates, "rec")
    gc_templates = load_templates(config.gc_templates, "gc")
    flickr_templates = load_templates(config.flickr_templates, "flickr")
    for path in config.rec_files:
        items.extend(_region_items(ctx, Path(path), "rec", rec_templates))
    for path in config.gc_files:
        items.extend(_region_items(ctx, Path(path), "gc", gc_templates))
    for path in config.flickr_files:
        items.extend(_flickr_items(ctx, Path(path), flickr_templates))
    for item in items:
        ctx.stats.items[item["id"].split(":", 1)[0]] += 1
    if not items and ctx.stats.missing_images and len(ctx.exists) == len(ctx.stats.missing_images):
        raise ValueError(
            f"all {len(ctx.stats.missing_images)} images are missing (first: {ctx.stats.missing_images[0]}); "
            "check --image-root"
        )
    if ctx.stats.missing_images:
        logger.warning(
            "%d images missing, their records skipped; first: %s",
            len(ctx.stats.missing_images),
            ", ".join(ctx.stats.missing_images[:5]),
        )
    if config.mix_sft is not None and config.mix_ratio > 0:
        mixed = mix_sft_items(config, len(items))
        ctx.stats.items["sft"] = len(mixed)
        items.extend(mixed)
    return items, ctx.stats


def write_items(items: list[dict], out: Path, overwrite: bool) -> None:
    """Write a JSON list, one item per line, atomically; refuses an existing file without `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    write_text_atomic(
        out, "[\n" + ",\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n]\n"
    )


def prepare_grounding(config: GroundingPrepConfig) -> GroundingPrepStats:
    """Build the conversations and write them to `config.out`; refuses an existing file without `overwrite`."""
    if Path(config.out).exists() and not config.overwrite:
        raise FileExistsError(f"{config.out} exists; pass --overwrite to replace it")
    items, stats = build_grounding_items(config)
    write_items(items, config.out, config.overwrite)
    return stats
