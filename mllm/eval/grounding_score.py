"""Grounding evaluation without a model: score a predictions file (Acc@IoU0.5 per RefCOCO split) and draw pictures.

A predictions jsonl has one line per expression with at least `expression`, `bbox` (ground truth, pixels),
`width`, `height`, and either `answer` (model text, read with `mllm.boxes.parse_box`) or `pred_bbox`
(pixels). `split` names the split; without it the split comes from the caller or the file name
(`REC_refcoco+_unc_testA.jsonl` -> `refcoco+_testA`). `img_path` / `image` are used for pictures and, when
`width`/`height` are absent, for the image size. An answer without a box counts as wrong and is listed.
The model-driven generation loop writes such a file and calls `score_predictions` and `markdown_table`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mllm.boxes import iou as box_iou
from mllm.boxes import parse_box, to_pixels
from mllm.data.grounding import read_jsonl
from mllm.io import open_image_header

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
SPLIT_ORDER = (
    "refcoco_val",
    "refcoco_testA",
    "refcoco_testB",
    "refcoco+_val",
    "refcoco+_testA",
    "refcoco+_testB",
    "refcocog_val",
    "refcocog_test",
)
_SPLIT_RE = re.compile(
    r"(refcocog|refcoco\+|refcoco)(?:_(?:unc|umd|google))?_(val|testA|testB|test)\b", re.IGNORECASE
)
_GT_COLOR = (0, 200, 0)
_PRED_COLOR = (230, 0, 0)


def split_name_from_path(path: str | Path) -> str:
    """`REC_refcoco_unc_val.jsonl` -> `refcoco_val`, `REC_refcocog_umd_test.jsonl` -> `refcocog_test`; any other
    name -> the file's stem (so unknown data sets still get a row of their own)."""
    stem = Path(str(path)).name
    for suffix in (".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    match = _SPLIT_RE.search(stem)
    if match is None:
        return stem
    dataset, split = match.group(1).lower(), match.group(2)
    split = {"testa": "testA", "testb": "testB"}.get(split.lower(), split.lower())
    return f"{dataset}_{split}"


def _bad(where: str, name: str, reason: str) -> ValueError:
    return ValueError(f"{where}, field '{name}': {reason}")


def _pixel_box(value: object, where: str, name: str) -> tuple[float, float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise _bad(where, name, f"expected [x0, y0, x1, y1] in pixels, got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _image_path(record: dict, image_root: Path | None) -> Path | None:
    name = record.get("img_path") or record.get("image")
    if not isinstance(name, str) or len(name) > 1000:  # long strings are base64 images, not paths
        return None
    return Path(image_root) / name if image_root is not None else Path(name)


def _size(record: dict, where: str, image_root: Path | None) -> tuple[float, float]:
    width, height = record.get("width"), record.get("height")
    if width is not None and height is not None:
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height)
        ):
            raise _bad(where, "width/height", f"expected positive numbers, got {width!r}, {height!r}")
        return float(width), float(height)
    image = _image_path(record, image_root)
    if image is None or not image.is_file():
        raise _bad(
            where, "width", "needed to convert the answer to pixels (or an image found under --image-root)"
        )
    with open_image_header(image, f"{where}: image {image}") as img:  # RecordError: a ValueError
        return float(img.size[0]), float(img.size[1])


def score_item(
    record: dict, where: str, split: str, box_format: str = "auto", image_root: Path | None = None
) -> dict:
    """One prediction -> its scored form: gt and predicted pixel boxes, IoU, correct, parsed flag."""
    expression = record.get("expression")
    if not isinstance(expression, str):
        raise _bad(where, "expression", f"expected a string, got {expression!r}")
    gt = _pixel_box(record.get("bbox"), where, "bbox")
    answer = record.get("answer")
    if record.get("pred_bbox") is not None:
        pred = _pixel_box(record["pred_bbox"], where, "pred_bbox")
    elif isinstance(answer, str):
        size = _size(record, where, image_root) if box_format == "qwen25vl" else None  # its boxes are pixels
        grid_box = parse_box(answer, box_format, size)
        pred = None if grid_box is None else to_pixels(grid_box, *(size or _size(record, where, image_root)))
    else:
        raise _bad(where, "answer", f"expected the model's answer text or a pred_bbox, got {answer!r}")
    overlap = box_iou(gt, pred) if pred is not None else 0.0
    image = _image_path(record, image_root)
    return {
        "source": where,
        "split": split,
        "expression": expression,
        "answer": answer,
        "gt_bbox": list(gt),
        "pred_bbox": list(pred) if pred is not None else None,
        "iou": overlap,
        "correct": overlap >= IOU_THRESHOLD,
        "image": str(image) if image is not None else None,
    }


def _records(paths: Sequence[Path]) -> Iterable[tuple[Path, int, dict]]:
    for path in paths:
        for lineno, record in read_jsonl(path):
            yield path, lineno, record


def _split_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name), "") if name in SPLIT_ORDER else (len(SPLIT_ORDER), name)


def summarize(items: list[dict]) -> dict:
    """Per-split and overall counts and accuracy, plus the list of unparsable answers."""
    splits: dict[str, dict] = {}
    for item in items:
        row = splits.setdefault(item["split"], {"n": 0, "correct": 0, "unparsable": 0})
        row["n"] += 1
        row["correct"] += int(item["correct"])
        row["unparsable"] += int(item["pred_bbox"] is None)
    ordered = {name: splits[name] for name in sorted(splits, key=_split_key)}
    for row in ordered.values():
        row["acc"] = row["correct"] / row["n"]
    total = len(items)
    correct = sum(int(item["correct"]) for item in items)
    unparsable = [
        {k: item[k] for k in ("source", "split", "expression", "answer")}
        for item in items
        if item["pred_bbox"] is None
    ]
    return {
        "iou_threshold": IOU_THRESHOLD,
        "splits": ordered,
        "overall": {
            "n": total,
            "correct": correct,
            "unparsable": len(unparsable),
            "acc": correct / total if total else 0.0,
        },
        "unparsable": unparsable,
        "items": items,
    }


def score_predictions(
    paths: str | Path | Sequence[str | Path],
    box_format: str = "auto",
    split: str | None = None,
    image_root: Path | None = None,
) -> dict:
    """Score one or more predictions jsonl files.

    A line's split is its `split` field (a file-like name is canonicalised), else `split`, else the file name.
    Returns {"iou_threshold", "splits": {name: {n, correct, unparsable, acc}}, "overall", "unparsable": [...],
    "items": [per-item scores]}; `items` is for pictures and is left out of the JSON summary by the CLI.
    """
    path_list = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    items = []
    for path, lineno, record in _records(path_list):
        where = f"{path}, line {lineno}"
        raw_split = record.get("split")
        if raw_split is not None and not isinstance(raw_split, str):
            raise _bad(where, "split", f"expected a string, got {raw_split!r}")
        name = split_name_from_path(raw_split) if raw_split else (split or split_name_from_path(path))
        items.append(score_item(record, where, name, box_format, image_root))
    if not items:
        raise ValueError(f"no predictions in {', '.join(str(p) for p in path_list)}")
    return summarize(items)


def markdown_table(summary: dict) -> str:
    """A markdown table: one row per split (RefCOCO order first) and an overall row; accuracy in percent."""
    lines = ["| split | n | correct | Acc@0.5 (%) | unparsable |", "|---|---:|---:|---:|---:|"]
    rows = list(summary["splits"].items()) + [("overall", summary["overall"])]
    for name, row in rows:
        lines.append(
            f"| {name} | {row['n']} | {row['correct']} | {100 * row['acc']:.2f} | {row['unparsable']} |"
        )
    return "\n".join(lines)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, max_width: float) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > max_width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + [current] if current else lines or [""]


def visualize(
    image: Image.Image | str | Path,
    expression: str,
    gt_box: Sequence[float] | None,
    pred_box: Sequence[float] | None,
    iou: float | None,
    out_png: str | Path,
) -> Path:
    """Draw the ground truth (green) and the prediction (red, labelled with its IoU) on the image, with the
    expression as a caption strip below it, and save a PNG. Pixel boxes; `pred_box` None means no box parsed;
    `gt_box` / `iou` None (one-shot use without a ground truth) leave the green box / the IoU label out."""
    base = Image.open(image) if isinstance(image, (str, Path)) else image
    base = base.convert("RGB")
    width, height = base.size
    font = ImageFont.load_default(size=max(12, min(width, height) // 25))
    measure = ImageDraw.Draw(base)
    caption = _wrap(measure, expression, font, width - 10)
    line_h = int(font.getbbox("Ag")[3]) + 4
    canvas = Image.new("RGB", (width, height + line_h * len(caption) + 8), "white")
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    thickness = max(2, min(width, height) // 150)
    if gt_box is not None:
        draw.rectangle(list(gt_box), outline=_GT_COLOR, width=thickness)
    if pred_box is not None:
        draw.rectangle(list(pred_box), outline=_PRED_COLOR, width=thickness)
        label = f"IoU {iou:.2f}" if iou is not None else "prediction"
        x, y = pred_box[0], max(0.0, pred_box[1] - line_h)
        draw.rectangle(draw.textbbox((x, y), label, font=font), fill=_PRED_COLOR)
        draw.text((x, y), label, fill="white", font=font)
    else:
        draw.text((5, 5), "no box parsed", fill=_PRED_COLOR, font=font)
    for i, line in enumerate(caption):
        draw.text((5, height + 4 + i * line_h), line, fill="black", font=font)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def visualize_items(items: Sequence[dict], out_dir: Path) -> list[Path]:
    """Pictures of scored items (as `score_predictions` returns them, `image` already joined to the image root);
    items without a readable image are skipped with a warning."""
    written = []
    for index, item in enumerate(items):
        image = item.get("image")
        if image is None or not Path(image).is_file():
            logger.warning("%s: image %s not found, no picture", item["source"], image)
            continue
        name = f"{index:04d}_{item['split']}_{'ok' if item['correct'] else 'wrong'}.png"
        written.append(
            visualize(
                image,
                item["expression"],
                item["gt_bbox"],
                item["pred_bbox"],
                item["iou"],
                Path(out_dir) / name,
            )
        )
    return written
