"""Grounding mode of the page: every box of an answer, with a label, drawn on the image.

Boxes are read with `mllm.boxes.parse_box` (all syntaxes it knows: `[x0, y0, x1, y1]` on 0..1000, Qwen's
`<box>(x1,y1),(x2,y2)</box>`, Shikra's 0..1 floats). `parse_box` returns the first box of a text, so the answer is
cut into pieces that each end with a box's closing mark and each piece is parsed on its own.
"""

from __future__ import annotations

import re

from PIL import Image, ImageDraw, ImageFont

from mllm.boxes import parse_box, to_pixels

_PIECE_END_RE = re.compile(r"(?<=\])|(?<=</box>)")
_REF_RE = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)
_BOX_START_RE = re.compile(r"<box>|\[")
_TAG_RE = re.compile(r"</?\w+>")
_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
_LABEL_WORDS = 4


def _label(piece: str, index: int) -> str:
    """What a box is of: the last `<ref>...</ref>` before it, else the last few words before it, else 'box N'."""
    refs = _REF_RE.findall(piece)
    if refs:
        return refs[-1].strip() or f"box {index}"
    start = _BOX_START_RE.search(piece)
    before = _TAG_RE.sub(" ", piece[: start.start()] if start else piece)
    words = re.findall(r"[\w'-]+", before)
    return " ".join(words[-_LABEL_WORDS:]) or f"box {index}"


def find_boxes(text: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Every box in `text` as (label, box on the 0..1000 grid), in order of appearance."""
    found = []
    for piece in _PIECE_END_RE.split(text or ""):
        box = parse_box(piece)
        if box is not None and box[2] > box[0] and box[3] > box[1]:
            found.append((_label(piece, len(found) + 1), box))
    return found


def draw_boxes(image: Image.Image, boxes: list[tuple[str, tuple[float, float, float, float]]]) -> Image.Image:
    """A copy of `image` with each (label, grid box) drawn as a coloured rectangle with its label on top."""
    canvas = image.convert("RGB")
    width, height = canvas.size
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, min(width, height) // 28))
    thickness = max(2, min(width, height) // 150)
    for i, (label, grid_box) in enumerate(boxes):
        color = _COLORS[i % len(_COLORS)]
        x0, y0, x1, y1 = to_pixels(grid_box, width, height)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=thickness)
        text_box = draw.textbbox((x0, y0), label, font=font)
        lift = text_box[3] - text_box[1] + 2
        y = y0 - lift if y0 >= lift else y0
        draw.rectangle(draw.textbbox((x0, y), label, font=font), fill=color)
        draw.text((x0, y), label, fill="white", font=font)
    return canvas
