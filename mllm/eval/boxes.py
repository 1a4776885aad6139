"""The one box convention of the project: how boxes are written into text and read back.

Convention (what the model is trained to write and what evaluation reads):

- A box is `[x0, y0, x1, y1]`: integers on a 0..1000 grid relative to the image size, 0 = left/top edge,
  1000 = right/bottom edge. Pixels -> grid: `round(x / width * 1000)` clamped to 0..1000 (y with the height).
  Grid -> pixels: `g / 1000 * width`. The round trip loses at most half a grid step (width / 2000 pixels).
- Expressions are wrapped as `<ref>expr</ref>` where a prompt needs to delimit them.

`parse_box` also reads the two other conventions of the literature and returns every box on *this* grid
(floats in 0..1000), so `to_pixels` applies to all of them:

- Qwen-VL: `<box>(x1,y1),(x2,y2)</box>` on a 0..1000 grid that Qwen's scoring divides by 999; we do the same,
  so a Qwen value v becomes v / 999 * 1000 on our grid.
- Shikra: `[x0,y0,x1,y1]` floats normalised to 0..1 (3 decimals); several boxes of one phrase separated by `;`.
  With `box_format="auto"` a bracketed box whose four values are all <= 1 and written with a decimal point is
  taken as Shikra's; `[0, 0, 1, 1]` with integers stays on the 0..1000 grid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GRID = 1000
QWEN_SCALE = 999
BOX_FORMATS = ("auto", "mllm", "qwen", "shikra")
OUTPUT_BOX_FORMATS = ("mllm", "qwen", "shikra")

Box = tuple[float, float, float, float]

_NUM = r"[-+]?\d+(?:\.\d*)?"
_BRACKET_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\];]")
_QWEN_RE = re.compile(
    rf"<box>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*</box>"
)


def _check_size(width: float, height: float) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image width and height must be positive, got width={width}, height={height}")


def normalize_box(box_xyxy_pixels: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Pixel box -> integers on the 0..1000 grid (round to nearest, clamped to the grid)."""
    _check_size(width, height)
    if len(box_xyxy_pixels) != 4:
        raise ValueError(f"a box needs 4 numbers [x0, y0, x1, y1], got {list(box_xyxy_pixels)}")
    x0, y0, x1, y1 = (float(v) for v in box_xyxy_pixels)
    sizes = (width, height, width, height)
    return tuple(min(GRID, max(0, round(v / s * GRID))) for v, s in zip((x0, y0, x1, y1), sizes))  # type: ignore[return-value]


def format_box(
    box_xyxy_pixels: Sequence[float], width: float, height: float, box_format: str = "mllm"
) -> str:
    """Pixel box -> its text: `[x0, y0, x1, y1]` on the 0..1000 grid (default), or Qwen's / Shikra's syntax."""
    return format_boxes([box_xyxy_pixels], width, height, box_format)


def format_boxes(
    boxes_xyxy_pixels: Sequence[Sequence[float]], width: float, height: float, box_format: str = "mllm"
) -> str:
    """Several boxes (e.g. one phrase naming two objects) as one text in the chosen syntax.

    mllm: `[a, b, c, d], [e, f, g, h]`; qwen: `<box>(a,b),(c,d)</box><box>...</box>` with values round(x / w * 999);
    shikra: `[0.100,0.200,0.300,0.400;...]`.
    """
    if box_format not in OUTPUT_BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; choose one of {', '.join(OUTPUT_BOX_FORMATS)}")
    _check_size(width, height)
    if box_format == "mllm":
        return ", ".join(
            "[{}, {}, {}, {}]".format(*normalize_box(b, width, height)) for b in boxes_xyxy_pixels
        )
    fractions = [_fractions(b, width, height) for b in boxes_xyxy_pixels]
    if box_format == "qwen":
        texts = []
        for f in fractions:
            q = [round(v * QWEN_SCALE) for v in f]
            texts.append(f"<box>({q[0]},{q[1]}),({q[2]},{q[3]})</box>")
        return "".join(texts)
    return "[" + ";".join(",".join(f"{v:.3f}" for v in f) for f in fractions) + "]"


def _fractions(box: Sequence[float], width: float, height: float) -> list[float]:
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers [x0, y0, x1, y1], got {list(box)}")
    sizes = (width, height, width, height)
    return [min(1.0, max(0.0, float(v) / s)) for v, s in zip(box, sizes)]


def to_pixels(box_norm: Sequence[float], width: float, height: float) -> Box:
    """A box on the 0..1000 grid (as `parse_box` returns it) -> pixel coordinates (floats)."""
    _check_size(width, height)
    x0, y0, x1, y1 = (float(v) for v in box_norm)
    return (x0 / GRID * width, y0 / GRID * height, x1 / GRID * width, y1 / GRID * height)


def _ordered(values: Sequence[float]) -> Box:
    """Swap corners given in the wrong order and clamp to the grid."""
    x0, y0, x1, y1 = (min(float(GRID), max(0.0, v)) for v in values)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _parse_qwen(text: str) -> Box | None:
    match = _QWEN_RE.search(text)
    if match is None:
        return None
    return _ordered([float(v) / QWEN_SCALE * GRID for v in match.groups()])


def _parse_bracket(text: str, box_format: str) -> Box | None:
    match = _BRACKET_RE.search(text)
    if match is None:
        return None
    raw = match.groups()
    values = [float(v) for v in raw]
    shikra = box_format == "shikra" or (
        box_format == "auto" and all(abs(v) <= 1.0 for v in values) and any("." in v for v in raw)
    )
    if shikra:
        values = [v * GRID for v in values]
    return _ordered(values)


def parse_box(text: str | None, box_format: str = "auto") -> Box | None:
    """The first box in a model answer, on the 0..1000 grid as floats, or None when there is none.

    `box_format`: "mllm" (`[x0, y0, x1, y1]` on 0..1000), "qwen" (`<box>(x1,y1),(x2,y2)</box>`, divided by 999),
    "shikra" (`[x0,y0,x1,y1]` in 0..1) or "auto" (Qwen's syntax if present, else a bracketed box whose scale is
    guessed as described in the module docstring). Spaces are tolerated, swapped corners are reordered, values
    outside the grid are clamped. Garbage gives None, never an exception; an unknown `box_format` is a caller bug
    and raises ValueError.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; choose one of {', '.join(BOX_FORMATS)}")
    if not isinstance(text, str):
        return None
    if box_format == "qwen":
        return _parse_qwen(text)
    if box_format == "auto":
        qwen = _parse_qwen(text)
        if qwen is not None:
            return qwen
    return _parse_bracket(text, box_format)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes in the same units; 0 when the union is empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    inter_w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    inter_h = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = inter_w * inter_h
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def wrap_ref(expr: str) -> str:
    """Delimit a referring expression inside a prompt: `<ref>expr</ref>`."""
    return f"<ref>{expr}</ref>"
