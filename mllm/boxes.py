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

The other model families' syntaxes (what `mllm.vlm` models write, and what `mllm prepare-grounding --box-format`
writes for them):

- llava: `[0.12, 0.34, 0.56, 0.78]`, floats normalised to 0..1 with 2 decimals (LLaVA-1.5's grounding data);
  parsed like Shikra's.
- qwen2vl: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` on a 0..1000 grid divided by 1000 (Qwen2-VL), the expression
  wrapped as `<|object_ref_start|>expr<|object_ref_end|>`; "auto" recognises it.
- qwen25vl: the same tags with absolute pixel coordinates of the image as the model sees it (Qwen2.5-VL): the
  image resized by Qwen2-VL's `smart_resize` (`qwen25vl_frame`). Parsing needs the image size, and also reads the
  JSON form `"bbox_2d": [x1, y1, x2, y2]`; "auto" cannot tell these pixels from a grid, so name the format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GRID = 1000
QWEN_SCALE = 999
QWEN2VL_SCALE = 1000
BOX_FORMATS = ("auto", "mllm", "qwen", "shikra", "llava", "qwen2vl", "qwen25vl")
OUTPUT_BOX_FORMATS = ("mllm", "qwen", "shikra", "llava", "qwen2vl", "qwen25vl")
NORMALISED_FORMATS = ("shikra", "llava")
"""Formats whose values are fractions of the image size (0..1)."""
QWEN25VL_MIN_PIXELS, QWEN25VL_MAX_PIXELS = 3136, 12845056
"""Qwen2.5-VL's released preprocessor_config.json (the frame its absolute coordinates live in)."""

Box = tuple[float, float, float, float]

_NUM = r"[-+]?\d+(?:\.\d*)?"
_BRACKET_RE = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*[\];]")
_PAIRS = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_QWEN_RE = re.compile(rf"<box>\s*{_PAIRS}\s*</box>")
_QWEN2VL_RE = re.compile(rf"<\|box_start\|>\s*{_PAIRS}\s*<\|box_end\|>")
_BBOX_2D_RE = re.compile(
    rf"\"bbox_2d\"\s*:\s*\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]"
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


def snap_box(box_xyxy_pixels: Sequence[float], width: float, height: float, bins: int) -> list[float]:
    """A pixel box with each coordinate moved to the nearest of `bins` equal steps of its image side (coordinate
    quantisation, as Pix2Seq's and Kosmos-2's location bins): with 20 bins the mllm format's 0..1000 values become
    multiples of 50. A side that would shrink to nothing keeps one step. Pixels in, pixels out."""
    _check_size(width, height)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    sizes = (width, height, width, height)
    steps = [round(float(v) / s * bins) for v, s in zip(box_xyxy_pixels, sizes)]
    for low, high in ((0, 2), (1, 3)):
        if steps[high] <= steps[low]:  # keep one step, inside the image
            steps[high] = steps[low] + 1
            if steps[high] > bins:
                steps[low], steps[high] = bins - 1, bins
    return [k / bins * s for k, s in zip(steps, sizes)]


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
    shikra: `[0.100,0.200,0.300,0.400;...]`; llava: `[0.10, 0.20, 0.30, 0.40], [...]`; qwen2vl:
    `<|box_start|>(a,b),(c,d)<|box_end|>...` with values round(x / w * 1000); qwen25vl: the same tags with pixels of
    `qwen25vl_frame(width, height)`.
    """
    if box_format not in OUTPUT_BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; choose one of {', '.join(OUTPUT_BOX_FORMATS)}")
    _check_size(width, height)
    if box_format == "mllm":
        return ", ".join(
            "[{}, {}, {}, {}]".format(*normalize_box(b, width, height)) for b in boxes_xyxy_pixels
        )
    fractions = [_fractions(b, width, height) for b in boxes_xyxy_pixels]
    if box_format == "shikra":
        return "[" + ";".join(",".join(f"{v:.3f}" for v in f) for f in fractions) + "]"
    if box_format == "llava":
        return ", ".join("[" + ", ".join(f"{v:.2f}" for v in f) + "]" for f in fractions)
    if box_format == "qwen":
        return "".join("<box>({},{}),({},{})</box>".format(*_scaled(f, QWEN_SCALE)) for f in fractions)
    scale = (QWEN2VL_SCALE,) * 4 if box_format == "qwen2vl" else _frame_scale(width, height)
    return "".join("<|box_start|>({},{}),({},{})<|box_end|>".format(*_scaled(f, scale)) for f in fractions)


def _scaled(fractions: Sequence[float], scale: float | Sequence[float]) -> list[int]:
    scales = scale if isinstance(scale, Sequence) else (scale,) * 4
    return [round(v * s) for v, s in zip(fractions, scales)]


def qwen25vl_frame(
    width: float, height: float, min_pixels: int = QWEN25VL_MIN_PIXELS, max_pixels: int = QWEN25VL_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of the image as Qwen2.5-VL sees it (transformers' `smart_resize`, factor 28): the frame of
    its absolute box coordinates."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    _check_size(width, height)
    resized_height, resized_width = smart_resize(
        round(height), round(width), factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return resized_width, resized_height


def _frame_scale(width: float, height: float) -> tuple[int, int, int, int]:
    frame_width, frame_height = qwen25vl_frame(width, height)
    return (frame_width, frame_height, frame_width, frame_height)


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


def _parse_tagged(pattern: re.Pattern, text: str, scale: Sequence[float]) -> Box | None:
    """The first box of a tag syntax, its values divided by `scale` (per coordinate) onto our grid."""
    match = pattern.search(text)
    if match is None:
        return None
    return _ordered([float(v) / s * GRID for v, s in zip(match.groups(), scale)])


def _parse_bracket(text: str, box_format: str) -> Box | None:
    match = _BRACKET_RE.search(text)
    if match is None:
        return None
    raw = match.groups()
    values = [float(v) for v in raw]
    normalised = box_format in NORMALISED_FORMATS or (
        box_format == "auto" and all(abs(v) <= 1.0 for v in values) and any("." in v for v in raw)
    )
    if normalised:
        values = [v * GRID for v in values]
    return _ordered(values)


def _parse_qwen25vl(text: str, size: tuple[float, float] | None) -> Box | None:
    if size is None:
        raise ValueError("box format 'qwen25vl' holds absolute pixels: parse_box needs the image size")
    scale = _frame_scale(*size)
    for pattern in (_QWEN2VL_RE, _BBOX_2D_RE):
        box = _parse_tagged(pattern, text, scale)
        if box is not None:
            return box
    return None


def parse_box(
    text: str | None, box_format: str = "auto", size: tuple[float, float] | None = None
) -> Box | None:
    """The first box in a model answer, on the 0..1000 grid as floats, or None when there is none.

    `box_format`: "mllm" (`[x0, y0, x1, y1]` on 0..1000), "qwen" (`<box>(x1,y1),(x2,y2)</box>`, divided by 999),
    "shikra" / "llava" (`[x0,y0,x1,y1]` in 0..1), "qwen2vl" (`<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, divided by
    1000), "qwen25vl" (the same tags or `"bbox_2d": [...]` in pixels of `qwen25vl_frame(*size)`; needs `size`, the
    image's (width, height)) or "auto" (a Qwen or Qwen2-VL tag if present, else a bracketed box whose scale is
    guessed as described in the module docstring). Spaces are tolerated, swapped corners are reordered, values
    outside the grid are clamped. Garbage gives None, never an exception; an unknown `box_format` (or qwen25vl
    without a size) is a caller bug and raises ValueError.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box format {box_format!r}; choose one of {', '.join(BOX_FORMATS)}")
    if box_format == "qwen25vl":
        return _parse_qwen25vl(text, size) if isinstance(text, str) else None
    if not isinstance(text, str):
        return None
    tagged = {"qwen": (_QWEN_RE, QWEN_SCALE), "qwen2vl": (_QWEN2VL_RE, QWEN2VL_SCALE)}
    if box_format in tagged:
        pattern, scale = tagged[box_format]
        return _parse_tagged(pattern, text, (scale,) * 4)
    if box_format == "auto":
        for pattern, scale in tagged.values():
            box = _parse_tagged(pattern, text, (scale,) * 4)
            if box is not None:
                return box
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


def wrap_ref(expr: str, box_format: str = "mllm") -> str:
    """Delimit a referring expression inside a prompt: `<ref>expr</ref>`, or Qwen2-VL's
    `<|object_ref_start|>expr<|object_ref_end|>` for the qwen2vl and qwen25vl formats."""
    if box_format in ("qwen2vl", "qwen25vl"):
        return f"<|object_ref_start|>{expr}<|object_ref_end|>"
    return f"<ref>{expr}</ref>"
