"""The toy world: small synthetic images of coloured shapes, written out in the real data formats.

Without the 8B checkpoint and the real datasets, every pipeline (SFT, CHAIR, grounding, preference training) still
needs data it can learn from on a CPU in minutes. This module draws 112x112 images with 1-4 non-overlapping objects
(6 shapes x 6 colours) and derives, from the same scene descriptions, files in exactly the formats the real
pipelines read (REFERENCE.md section 2), so the demo exercises the real code paths rather than toy ones:

- `sft/train.json`, `sft/test.json`: MME-style yes/no pairs and detailed descriptions (a controlled share of the train
  descriptions mention an absent object, so a trained model hallucinates measurably);
- `objhal_bench.jsonl` + `coco/annotations/*.json` + `coco/synonyms.txt`: so `mllm chair` scores hallucinated shapes;
- `grounding/rec_{train,val}.jsonl` + `grounding/templates_rec.json`: Shikra-format REC;
- `preference/preference_train.json`: RLAIF-V-format pairs (chosen = correct, rejected = hallucinating).

Every relative image path in every file is relative to the output folder (the "image folder"). Generation is
deterministic: each image has its own random generator seeded from (seed, split, index), and PNG encoding is
deterministic, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
"""Object categories: CHAIR scores these words (they are the COCO-format category names)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (145, 55, 190),
    "orange": (245, 135, 25),
}
"""Attribute colours, far apart in RGB so a small vision tower can tell them apart."""

PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

QUESTION_TYPES: tuple[str, ...] = ("existence", "color", "count", "position")
"""Yes/no question categories; as in MME, the category is also the image's folder name."""

DESCRIBE_QUESTION = "Describe this image in detail."
YES_NO_SUFFIX = " Please answer yes or no."
SPLITS: tuple[str, ...] = ("train", "test")
MIN_BASE64_CHARS = 1001
"""The exercise tells a base64 image from a path by length (> 1000 characters): keep every image above it."""

REC_TEMPLATES: tuple[str, ...] = (
    "<image>\nWhere is <expr> in image? answer in [x0,y0,x1,y1] format.",
    "<image>\nGive the bounding box of <expr>.",
    "<image>\nFind <expr> in the image and output its box.",
)


@dataclass
class ToyWorldConfig:
    """Knobs of the toy world. Defaults give about 2,300 images, enough for the full CPU demo."""

    seed: int = 0
    """Master seed: the same seed gives byte-identical files."""
    n_train: int = 2000
    """Training images; each gives yes/no pairs, open questions, one description and its REC records."""
    n_test: int = 300
    """Held-out images (SFT test set, objhal bench, COCO val annotations, REC val)."""
    train_yes_no_pairs: int = 2
    """Yes/no pairs per training image: its own category's, then pairs of other categories the scene supports
    (held-out images keep one pair, as in MME)."""
    open_questions: bool = True
    """Per training image, open questions whose answers name what the yes/no questions ask about: the colours present,
    the number of objects, the colour of a shape that is unique in the image. A model trained from scratch on
    MME-paired yes/no alone stays at chance (neither the question nor the image alone predicts the answer); with these
    beside them it learned colour-presence and count pairs in probes (docs/LOG.md, 2026-11-26)."""
    lookup_questions: bool = False
    """Per training image, also short-answer questions for the lookups the other yes/no questions need: the shapes
    present ("What shapes are in the image?"), the shape of an object named by its colour ("What shape is the red
    object?", colour unique in the image) and the column and row of an object ("Which column is the red circle
    in?" -> "left."). A yes/no answer is learnt beside a short answer whose first word it compares (docs/LOG.md)."""
    noise_rate: float = 0.15
    """Share of TRAIN descriptions that mention an object absent from the image."""
    n_preference: int = 1000
    """Preference pairs, built on the first training images (capped at n_train)."""
    preference_image: str = "path"
    """How preference items carry the image: "path" (`image_path`) or "base64" (`image`)."""
    image_size: int = 112
    """Side of the square images in pixels."""
    min_objects: int = 1
    """Fewest objects per image."""
    max_objects: int = 4
    """Most objects per image."""
    min_object_size: int = 22
    """Smallest object side in pixels."""
    max_object_size: int = 34
    """Largest object side in pixels."""
    gap: int = 3
    """Minimum free pixels between the square footprints of two objects (objects never overlap)."""
    clutter: int = 4
    """Most small grey specks drawn on the background (0 disables clutter)."""
    pixel_noise: float = 0.0
    """Standard deviation of additive Gaussian pixel noise, in 0..255 levels (0 disables it)."""

    def validate(self) -> None:
        """Reject inconsistent knobs before any file is written, naming the field."""
        if not (1 <= self.n_train < 1_000_000 and 1 <= self.n_test < 1_000_000):
            raise ValueError(f"n_train and n_test must be in 1..999999, got {self.n_train} and {self.n_test}")
        if not 0.0 <= self.noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {self.noise_rate}")
        if not 1 <= self.train_yes_no_pairs <= len(QUESTION_TYPES):
            raise ValueError(
                f"train_yes_no_pairs must be in 1..{len(QUESTION_TYPES)}, got {self.train_yes_no_pairs}"
            )
        if self.n_preference < 0:
            raise ValueError(f"n_preference must be >= 0, got {self.n_preference}")
        if self.preference_image not in ("path", "base64"):
            raise ValueError(f"preference_image must be 'path' or 'base64', got {self.preference_image!r}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}"
            )
        if not 8 <= self.min_object_size <= self.max_object_size:
            raise ValueError(
                f"need 8 <= min_object_size <= max_object_size, got {self.min_object_size}, {self.max_object_size}"
            )
        if 2 * (self.max_object_size + self.gap) > self.image_size:
            raise ValueError(
                f"max_object_size {self.max_object_size} is too large for 4 objects in image_size {self.image_size}"
            )
        if self.clutter < 0 or self.pixel_noise < 0:
            raise ValueError(f"clutter and pixel_noise must be >= 0, got {self.clutter}, {self.pixel_noise}")


@dataclass
class ToyObject:
    """One drawn object: its category, attribute and tight pixel box [x1, y1, x2, y2] (inclusive extremes)."""

    shape: str
    color: str
    bbox: list[int]
    footprint: list[int]
    """[x, y, side] of the square the shape was drawn in (kept apart from the others' by `gap`)."""

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass
class Scene:
    """One image of the world and everything derived from it that the writers need."""

    split: str
    index: int
    image_id: int
    category: str
    objects: list[ToyObject]
    image_path: str = ""
    """Path relative to the output folder, e.g. images/count/train_00012.png."""
    png: bytes = b""
    noisy_description: bool = False
    description: str = ""
    """The caption used for SFT (noisy for the chosen share of training scenes)."""
    clean_description: str = ""
    qa: list[tuple[str, str]] = field(default_factory=list)
    """The yes/no pair: (question without suffix, "Yes"/"No")."""
    extra_qa: list[tuple[str, str]] = field(default_factory=list)
    """Training images only: more (question, answer) items, yes/no questions with their suffix and open questions."""


# --------------------------------------------------------------------------------------------------------------
# Geometry and language
# --------------------------------------------------------------------------------------------------------------


REGION_WORDS: tuple[str, ...] = ("top", "middle", "bottom", "left", "center", "right")
"""The words of `region`: the vertical thirds of the image, then the horizontal ones."""


def region(obj: ToyObject, image_size: int) -> tuple[str, str]:
    """Vertical and horizontal third of the object centre: (top|middle|bottom, left|center|right)."""
    cx, cy = obj.center
    third = image_size / 3

    def bucket(value: float, names: tuple[str, str, str]) -> str:
        return names[0] if value < third else names[2] if value >= 2 * third else names[1]

    return bucket(cy, REGION_WORDS[:3]), bucket(cx, REGION_WORDS[3:])


def position_phrase(vertical: str, horizontal: str) -> str:
    """Short fixed phrases ("at the top left", "on the right", "in the center") that a tiny model learns easily."""
    if vertical == "middle" and horizontal == "center":
        return "in the center"
    if vertical == "middle":
        return f"on the {horizontal}"
    if horizontal == "center":
        return f"at the {vertical}"
    return f"at the {vertical} {horizontal}"


def article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def count_sentence(n: int) -> str:
    return "There is 1 object." if n == 1 else f"There are {n} objects."


def object_sentence(shape: str, color: str, phrase: str) -> str:
    return f"{article(color)} {color} {shape} {phrase}."


def reading_order(objects: list[ToyObject], image_size: int) -> list[ToyObject]:
    """Top row first, left to right: a fixed order makes descriptions predictable for a small model."""
    rows = {"top": 0, "middle": 1, "bottom": 2}
    return sorted(objects, key=lambda o: (rows[region(o, image_size)[0]], o.center[0], o.center[1]))


def describe(objects: list[ToyObject], image_size: int) -> str:
    """The correct detailed description: a count sentence, then one sentence per object in reading order."""
    sentences = [count_sentence(len(objects))]
    for obj in reading_order(objects, image_size):
        sentences.append(object_sentence(obj.shape, obj.color, position_phrase(*region(obj, image_size))))
    return " ".join(sentences)


def absent_shapes(objects: list[ToyObject]) -> list[str]:
    present = {o.shape for o in objects}
    return [s for s in SHAPES if s not in present]


def uniquely_shaped(objects: list[ToyObject]) -> list[ToyObject]:
    """The objects whose shape no other object in the scene has ("the square" names exactly one of them)."""
    return [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]


def random_phrase(rng: np.random.Generator) -> str:
    vertical = ("top", "middle", "bottom")[int(rng.integers(3))]
    horizontal = ("left", "center", "right")[int(rng.integers(3))]
    return position_phrase(vertical, horizontal)


def hallucinated_description(
    objects: list[ToyObject], image_size: int, rng: np.random.Generator, mode: str
) -> str:
    """A description that mentions a shape absent from the image.

    mode "insert" adds a fake object sentence (the count includes it, as a confident annotator would write);
    mode "swap" replaces one present object's shape by an absent one, keeping colour, place and count.
    """
    fake_shape = rng.choice(absent_shapes(objects)).item()
    ordered = reading_order(objects, image_size)
    sentences = [object_sentence(o.shape, o.color, position_phrase(*region(o, image_size))) for o in ordered]
    if mode == "insert":
        color = rng.choice(list(COLORS)).item()
        sentences.insert(
            int(rng.integers(len(sentences) + 1)), object_sentence(fake_shape, color, random_phrase(rng))
        )
        count = len(objects) + 1
    elif mode == "swap":
        k = int(rng.integers(len(ordered)))
        victim = ordered[k]
        sentences[k] = object_sentence(fake_shape, victim.color, position_phrase(*region(victim, image_size)))
        count = len(objects)
    else:
        raise ValueError(f"hallucination mode must be 'insert' or 'swap', got {mode!r}")
    return " ".join([count_sentence(count)] + sentences)


def yes_no_pair(
    category: str, objects: list[ToyObject], image_size: int, rng: np.random.Generator
) -> list[tuple[str, str]] | None:
    """One Yes and one No question of the category about the same image (MME pairs its questions the same way).

    Returns None when this scene cannot support the category (the caller draws another scene).
    """
    if category == "existence":
        if rng.random() < 0.5:
            present = sorted({o.color for o in objects})
            absent = [c for c in COLORS if c not in present]
            yes_color, no_color = rng.choice(present).item(), rng.choice(absent).item()
            return [
                (f"Is there {article(yes_color).lower()} {yes_color} object in the image?", "Yes"),
                (f"Is there {article(no_color).lower()} {no_color} object in the image?", "No"),
            ]
        present = sorted({o.shape for o in objects})
        yes_shape = rng.choice(present).item()
        no_shape = rng.choice(absent_shapes(objects)).item()
        return [
            (f"Is there a {yes_shape} in the image?", "Yes"),
            (f"Is there a {no_shape} in the image?", "No"),
        ]
    if category == "color":
        unique = uniquely_shaped(objects)
        if not unique:
            return None
        obj = unique[int(rng.integers(len(unique)))]
        wrong = rng.choice([c for c in COLORS if c != obj.color]).item()
        return [(f"Is the {obj.shape} {obj.color}?", "Yes"), (f"Is the {obj.shape} {wrong}?", "No")]
    if category == "count":
        n = len(objects)
        wrong = rng.choice([k for k in range(1, 5) if k != n]).item()

        def ask(k: int) -> str:
            return (
                "Is there exactly 1 object in the image?"
                if k == 1
                else f"Are there exactly {k} objects in the image?"
            )

        return [(ask(n), "Yes"), (ask(wrong), "No")]
    if category == "position":
        options = []
        opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
        words = {
            "left": "on the left",
            "right": "on the right",
            "top": "at the top",
            "bottom": "at the bottom",
        }
        for obj in objects:
            for side in region(obj, image_size):
                if side in opposite:
                    options.append((obj, side))
        if not options:
            return None
        obj, side = options[int(rng.integers(len(options)))]
        name = f"the {obj.color} {obj.shape}"
        return [
            (f"Is {name} {words[side]} of the image?", "Yes"),
            (f"Is {name} {words[opposite[side]]} of the image?", "No"),
        ]
    raise ValueError(f"unknown question category {category!r}")


def yes_no_category(question: str) -> str | None:
    """The category of a training or test yes/no question (`yes_no_pair`'s question with the answer-format suffix,
    with or without the "<image>" line before it); None for any other question."""
    question = question.removeprefix("<image>\n")
    if not question.endswith(YES_NO_SUFFIX):
        return None
    question = question[: -len(YES_NO_SUFFIX)]
    if " exactly " in question:
        return "count"
    if question.endswith(" of the image?"):
        return "position"
    return "existence" if question.startswith("Is there ") else "color"


def open_questions(objects: list[ToyObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Short-answer questions about what the yes/no questions test: colours present, count, a unique shape's colour."""
    colors = [c for c in COLORS if any(o.color == c for o in objects)]
    n = len(objects)
    qa = [
        ("What colours are in the image?", ", ".join(colors) + "."),
        ("How many objects are in the image?", f"{n}."),
    ]
    unique = uniquely_shaped(objects)
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        qa.append((f"What colour is the {obj.shape}?", f"{obj.color}."))
    return qa


def lookup_questions(
    objects: list[ToyObject], image_size: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """Short-answer lookups whose answer's first word is what a yes/no question compares: the shapes present, the
    shape of an object named by its (unique) colour, and the column and row of an object named by colour and shape
    ("left."/"center."/"right.", "top."/"middle."/"bottom.", the words the position questions ask about)."""
    shapes = [s for s in SHAPES if any(o.shape == s for o in objects)]
    qa = [("What shapes are in the image?", ", ".join(shapes) + ".")]
    unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
    if unique:
        obj = unique[int(rng.integers(len(unique)))]
        qa.append((f"What shape is the {obj.color} object?", f"{obj.shape}."))
    obj = objects[int(rng.integers(len(objects)))]
    vertical, horizontal = region(obj, image_size)
    qa.append((f"Which column is the {obj.color} {obj.shape} in?", f"{horizontal}."))
    qa.append((f"Which row is the {obj.color} {obj.shape} in?", f"{vertical}."))
    return qa


def training_questions(scene: Scene, cfg: ToyWorldConfig, rng: np.random.Generator) -> list[tuple[str, str]]:
    """The extra training questions of one image: yes/no pairs of other categories the scene supports (random
    categories, up to `train_yes_no_pairs` pairs with the image's own), then the open questions if on. Each becomes
    its own single-turn item: multi-turn conversations of the same questions (more answers per image token) stayed
    at chance in the demo (docs/LOG.md)."""
    qa = []
    others = [c for c in QUESTION_TYPES if c != scene.category]
    pairs = 1
    for k in rng.permutation(len(others)):
        if pairs >= cfg.train_yes_no_pairs:
            break
        pair = yes_no_pair(others[int(k)], scene.objects, cfg.image_size, rng)
        if pair is not None:
            qa += [(question + YES_NO_SUFFIX, answer) for question, answer in pair]
            pairs += 1
    if cfg.open_questions:
        qa += open_questions(scene.objects, rng)
    if cfg.lookup_questions:
        qa += lookup_questions(scene.objects, cfg.image_size, rng)
    return qa


def referring_expression(
    obj: ToyObject, objects: list[ToyObject], image_size: int, rng: np.random.Generator
) -> str:
    """An expression that picks out `obj` uniquely: colour+shape always does (no two objects share both)."""
    variants = [
        f"the {obj.color} {obj.shape}",
        f"the {obj.color} {obj.shape} {position_phrase(*region(obj, image_size))}",
    ]
    if sum(o.shape == obj.shape for o in objects) == 1:
        variants.append(f"the {obj.shape}")
    if sum(o.color == obj.color for o in objects) == 1:
        variants.append(f"the {obj.color} object")
    return variants[int(rng.integers(len(variants)))]


# --------------------------------------------------------------------------------------------------------------
# Sampling and drawing
# --------------------------------------------------------------------------------------------------------------


def shape_points(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    """Polygon vertices of a shape filling the s x s square at (x, y); circles are handled by the caller."""
    e = s - 1
    cx, cy = x + e / 2, y + e / 2
    if shape == "square":
        m = e * 0.1
        return [(x + m, y + m), (x + e - m, y + m), (x + e - m, y + e - m), (x + m, y + e - m)]
    if shape == "triangle":
        return [(cx, y), (x + e, y + e), (x, y + e)]
    if shape == "diamond":
        return [(cx, y), (x + e, cy), (cx, y + e), (x, cy)]
    if shape == "cross":
        t = e / 6
        pts = [(-t, -3 * t), (t, -3 * t), (t, -t), (3 * t, -t), (3 * t, t), (t, t)]
        pts += [(t, 3 * t), (-t, 3 * t), (-t, t), (-3 * t, t), (-3 * t, -t), (-t, -t)]
        return [(cx + px, cy + py) for px, py in pts]
    if shape == "star":
        r = e / 2
        top = (
            cy - r + (2 * r - r * (1 + math.cos(math.pi / 5))) / 2
        )  # centre the star vertically in the square
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + radius * math.cos(angle), top + r + radius * math.sin(angle)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def sample_objects(rng: np.random.Generator, cfg: ToyWorldConfig) -> list[ToyObject] | None:
    """Place 1-4 objects with distinct (shape, colour) and non-overlapping footprints; None if placement failed."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = rng.permutation(len(SHAPES) * len(COLORS))[:n]
    squares: list[tuple[int, int, int]] = []
    objects = []
    for pair in pairs:
        shape, color = SHAPES[int(pair) // len(COLORS)], list(COLORS)[int(pair) % len(COLORS)]
        for _ in range(50):
            s = int(rng.integers(cfg.min_object_size, cfg.max_object_size + 1))
            x = int(rng.integers(1, cfg.image_size - s))
            y = int(rng.integers(1, cfg.image_size - s))
            if all(
                x + s + cfg.gap <= qx
                or qx + qs + cfg.gap <= x
                or y + s + cfg.gap <= qy
                or qy + qs + cfg.gap <= y
                for qx, qy, qs in squares
            ):
                break
        else:
            return None
        squares.append((x, y, s))
        if shape == "circle":
            bbox = [x, y, x + s - 1, y + s - 1]
        else:
            pts = shape_points(shape, x, y, s)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            bbox = [round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))]
        objects.append(ToyObject(shape=shape, color=color, bbox=bbox, footprint=[x, y, s]))
    return objects


def draw_scene(objects: list[ToyObject], rng: np.random.Generator, cfg: ToyWorldConfig) -> Image.Image:
    """Light background, optional grey specks (clutter), the objects, then optional pixel noise."""
    background = tuple(int(v) for v in rng.integers(225, 251, size=3))
    image = Image.new("RGB", (cfg.image_size, cfg.image_size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, cfg.clutter + 1)) if cfg.clutter else 0):
        gx, gy = (int(v) for v in rng.integers(0, cfg.image_size, size=2))
        r = int(rng.integers(1, 3))
        grey = int(rng.integers(140, 200))
        draw.ellipse([gx - r, gy - r, gx + r, gy + r], fill=(grey, grey, grey))
    for obj in objects:
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse(obj.bbox, fill=fill)
        else:
            draw.polygon(shape_points(obj.shape, *obj.footprint), fill=fill)
    if cfg.pixel_noise > 0:
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels + rng.normal(0.0, cfg.pixel_noise, size=pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes, padded with a text chunk if needed so its base64 is always read as an image."""

    def save(info: PngInfo | None) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    data = save(None)
    short = MIN_BASE64_CHARS - len(base64.b64encode(data))
    if short > 0:
        info = PngInfo()
        info.add_text("Comment", "toy world image " + "." * short)
        data = save(info)
    assert len(base64.b64encode(data)) >= MIN_BASE64_CHARS
    return data


def image_id_of(split: str, index: int) -> int:
    """COCO-style integer ids: held-out (val) images 1..n_test, training images from 1,000,001."""
    return index + 1 if split == "test" else 1_000_001 + index


def build_scene(cfg: ToyWorldConfig, split: str, index: int) -> Scene:
    """Sample, draw and describe one image; its generator depends only on (seed, split, index)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    category = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    for _ in range(200):
        objects = sample_objects(rng, cfg)
        qa = yes_no_pair(category, objects, cfg.image_size, rng) if objects else None
        if qa is not None:
            break
    else:
        raise ValueError(
            f"could not place objects for {split} image {index}: lower max_object_size or max_objects"
        )
    order = rng.permutation(2)
    scene = Scene(
        split=split,
        index=index,
        image_id=image_id_of(split, index),
        category=category,
        objects=objects,
        image_path=f"images/{category}/{split}_{index:05d}.png",
        qa=[qa[int(k)] for k in order],
    )
    scene.png = encode_png(draw_scene(objects, rng, cfg))
    scene.clean_description = describe(objects, cfg.image_size)
    scene.description = scene.clean_description
    if split == "train":
        scene.extra_qa = training_questions(scene, cfg, rng)
    return scene


def add_noise(scenes: list[Scene], cfg: ToyWorldConfig) -> None:
    """Make exactly round(noise_rate * n) training descriptions mention an absent object."""
    rng = np.random.default_rng([cfg.seed, 100])
    n_noisy = round(cfg.noise_rate * len(scenes))
    for k in sorted(int(i) for i in rng.permutation(len(scenes))[:n_noisy]):
        scene = scenes[k]
        scene.noisy_description = True
        scene.description = hallucinated_description(scene.objects, cfg.image_size, rng, "insert")


# --------------------------------------------------------------------------------------------------------------
# Writers (one per output format)
# --------------------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def sft_items(scenes: list[Scene], seed: int, split: str) -> list[dict]:
    """Per image: its yes/no pair, its description and (training images) the extra questions, one single-turn item
    each, shuffled (fixed order per seed), ids 0..N-1."""
    items = []
    for scene in scenes:
        for question, answer in scene.qa:
            items.append((scene.image_path, question + YES_NO_SUFFIX, answer))
        items.append((scene.image_path, DESCRIBE_QUESTION, scene.description))
        items.extend((scene.image_path, question, answer) for question, answer in scene.extra_qa)
    order = np.random.default_rng([seed, 200, SPLITS.index(split)]).permutation(len(items))
    out = []
    for new_id, k in enumerate(order):
        image, question, answer = items[int(k)]
        conversations = [
            {"role": "user", "content": "<image>\n" + question},
            {"role": "assistant", "content": answer},
        ]
        out.append({"id": new_id, "image": image, "conversations": conversations})
    return out


def coco_files(scenes: list[Scene], image_size: int) -> tuple[dict, dict]:
    """COCO 2014-format instances and captions: categories are the shapes, colour travels as an attribute."""
    info = {"description": "toy world (mllm.toy.world)"}
    images = [
        {"id": s.image_id, "file_name": s.image_path, "height": image_size, "width": image_size}
        for s in scenes
    ]
    categories = [{"id": k + 1, "name": shape, "supercategory": "shape"} for k, shape in enumerate(SHAPES)]
    annotations, captions = [], []
    for scene in scenes:
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.bbox
            w, h = x2 - x1 + 1, y2 - y1 + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": scene.image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "color": obj.color,
                }
            )
        captions.append(
            {"id": len(captions) + 1, "image_id": scene.image_id, "caption": scene.clean_description}
        )
    instances = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    caption_file = {"info": info, "licenses": [], "images": images, "annotations": captions}
    return instances, caption_file


def synonyms_text() -> str:
    """Reference CHAIR synonyms format: one line per category, node word first, then synonyms, comma-separated."""
    return "".join(f"{shape}, {PLURALS[shape]}\n" for shape in SHAPES)


def rec_records(scenes: list[Scene], cfg: ToyWorldConfig, salt: int) -> list[dict]:
    """Shikra REC records, one per object, with an expression unique within its image."""
    records = []
    for scene in scenes:
        rng = np.random.default_rng([cfg.seed, 300 + salt, scene.index])
        for obj in scene.objects:
            records.append(
                {
                    "img_path": scene.image_path,
                    "expression": referring_expression(obj, scene.objects, cfg.image_size, rng),
                    "bbox": list(obj.bbox),
                    "height": cfg.image_size,
                    "width": cfg.image_size,
                }
            )
    return records


def preference_items(scenes: list[Scene], cfg: ToyWorldConfig) -> list[dict]:
    """RLAIF-V pairs on the first training images: chosen = correct, rejected = inserted or swapped absent shape."""
    items = []
    for idx, scene in enumerate(scenes[: cfg.n_preference]):
        rng = np.random.default_rng([cfg.seed, 400, idx])
        mode = "insert" if rng.random() < 0.5 else "swap"
        item = {
            "idx": idx,
            "question": DESCRIBE_QUESTION,
            "chosen": scene.clean_description,
            "rejected": hallucinated_description(scene.objects, cfg.image_size, rng, mode),
        }
        if cfg.preference_image == "base64":
            item["image"] = base64.b64encode(scene.png).decode("ascii")
        else:
            item["image_path"] = scene.image_path
        items.append(item)
    return items


def scene_record(scene: Scene) -> dict:
    """Ground truth kept beside the data (tests and the demo read it; no real pipeline needs it)."""
    return {
        "image": scene.image_path,
        "image_id": scene.image_id,
        "split": scene.split,
        "category": scene.category,
        "objects": [{"shape": o.shape, "color": o.color, "bbox": list(o.bbox)} for o in scene.objects],
        "noisy_description": scene.noisy_description,
        "description": scene.description,
    }


OUTPUTS: tuple[str, ...] = (
    "images",
    "sft",
    "coco",
    "grounding",
    "preference",
    "objhal_bench.jsonl",
    "scenes.json",
    "README.md",
)
"""Everything `make_toy_world` writes directly under the output folder (and removes first when overwriting)."""


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless overwriting; then remove only what a previous run wrote."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"output folder {out_dir} is not empty (pass --overwrite to replace the toy world)"
            )
        for name in OUTPUTS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def make_toy_world(
    out_dir: str | Path, config: ToyWorldConfig | None = None, overwrite: bool = False, **overrides: Any
) -> dict[str, int]:
    """Generate the toy world into `out_dir`; keyword overrides set `ToyWorldConfig` fields (seed=1, n_train=50).

    Refuses a non-empty `out_dir` unless `overwrite`. Returns counts of what was written (images per split, SFT
    items, REC records, preference pairs, noisy captions).
    """
    known = {f.name for f in fields(ToyWorldConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown toy world option(s) {unknown}; known: {sorted(known)}")
    cfg = replace(config or ToyWorldConfig(), **overrides)
    cfg.validate()
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    train = [build_scene(cfg, "train", i) for i in range(cfg.n_train)]
    test = [build_scene(cfg, "test", i) for i in range(cfg.n_test)]
    add_noise(train, cfg)
    counts = {"train_images": len(train), "test_images": len(test)}
    counts |= write_images_and_sft(out, cfg, train, test)
    counts |= write_chair_files(out, cfg, train, test)
    counts |= write_grounding_and_preference(out, cfg, train, test)
    write_json(
        out / "scenes.json", {"config": asdict(cfg), "scenes": [scene_record(s) for s in train + test]}
    )
    (out / "README.md").write_text(readme_text(cfg, counts), encoding="utf-8")
    logger.info("toy world written to %s: %s", out, counts)
    return counts


def write_images_and_sft(
    out: Path, cfg: ToyWorldConfig, train: list[Scene], test: list[Scene]
) -> dict[str, int]:
    for scene in train + test:
        path = out / scene.image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(scene.png)
    sft_train, sft_test = sft_items(train, cfg.seed, "train"), sft_items(test, cfg.seed, "test")
    write_json(out / "sft" / "train.json", sft_train)
    write_json(out / "sft" / "test.json", sft_test)
    return {
        "sft_train_items": len(sft_train),
        "sft_test_items": len(sft_test),
        "noisy_train_descriptions": sum(s.noisy_description for s in train),
    }


def write_chair_files(
    out: Path, cfg: ToyWorldConfig, train: list[Scene], test: list[Scene]
) -> dict[str, int]:
    """objhal_bench.jsonl on the held-out images, their COCO val ground truth (train too), the synonyms file."""
    objhal = [
        {
            "image": base64.b64encode(s.png).decode("ascii"),
            "question": DESCRIBE_QUESTION,
            "image_id": s.image_id,
        }
        for s in test
    ]
    write_jsonl(out / "objhal_bench.jsonl", objhal)
    for split_name, scenes in (("val2014", test), ("train2014", train)):
        instances, captions = coco_files(scenes, cfg.image_size)
        write_json(out / "coco" / "annotations" / f"instances_{split_name}.json", instances, indent=None)
        write_json(out / "coco" / "annotations" / f"captions_{split_name}.json", captions, indent=None)
    (out / "coco" / "synonyms.txt").write_text(synonyms_text(), encoding="utf-8")
    return {"objhal_items": len(objhal)}


def write_grounding_and_preference(
    out: Path, cfg: ToyWorldConfig, train: list[Scene], test: list[Scene]
) -> dict[str, int]:
    rec_train, rec_val = rec_records(train, cfg, 0), rec_records(test, cfg, 1)
    write_jsonl(out / "grounding" / "rec_train.jsonl", rec_train)
    write_jsonl(out / "grounding" / "rec_val.jsonl", rec_val)
    write_json(out / "grounding" / "templates_rec.json", list(REC_TEMPLATES))
    preference = preference_items(train, cfg)
    write_json(out / "preference" / "preference_train.json", preference)
    return {"rec_train": len(rec_train), "rec_val": len(rec_val), "preference_pairs": len(preference)}


def readme_text(cfg: ToyWorldConfig, counts: dict[str, int]) -> str:
    """The README written into the output folder: what each file is and which real format it follows."""
    shapes, colors = ", ".join(SHAPES), ", ".join(COLORS)
    return f"""# Toy world (seed {cfg.seed})

Synthetic {cfg.image_size}x{cfg.image_size} PNG images with {cfg.min_objects}-{cfg.max_objects} non-overlapping objects.
Shapes (the object categories): {shapes}. Colours (attributes): {colors}.
Written by `mllm toy make` (`mllm.toy.world.make_toy_world`); the same seed and options give byte-identical files.

**Paths.** Every relative image path in every file (`image`, `img_path`, `image_path`, COCO `file_name`) is relative to
this folder: use this folder as the image folder.

| file | format | content |
|---|---|---|
| `images/<category>/<split>_<index>.png` | PNG | {counts["train_images"]} train + {counts["test_images"]} held-out images; category = the image's yes/no question type |
| `sft/train.json`, `sft/test.json` | SFT JSON list `{{"id", "image", "conversations"}}` | {counts["sft_train_items"]} / {counts["sft_test_items"]} items, one question each: per image one Yes and one No question (existence of a shape or a colour, color, count, position; ending with "{YES_NO_SUFFIX.strip()}") and one "{DESCRIBE_QUESTION}"; training images get up to {cfg.train_yes_no_pairs} such pairs{" and short-answer questions (the colours present, the number of objects, the colour of a shape)" if cfg.open_questions else ""} |
| `objhal_bench.jsonl` | `{{"image": base64 PNG, "question", "image_id"}}` | {counts["objhal_items"]} held-out images (ids 1..{cfg.n_test}) |
| `coco/annotations/instances_{{val,train}}2014.json` | COCO instances | categories = shapes (ids 1..{len(SHAPES)}), bbox [x, y, w, h], colour in `color` |
| `coco/annotations/captions_{{val,train}}2014.json` | COCO captions | one correct description per image |
| `coco/synonyms.txt` | CHAIR synonyms | one line per shape: node word, then synonyms |
| `grounding/rec_train.jsonl`, `grounding/rec_val.jsonl` | Shikra REC `{{"img_path", "expression", "bbox", "height", "width"}}` | {counts["rec_train"]} / {counts["rec_val"]} records, bbox [x1, y1, x2, y2] in pixels (inclusive extremes of the drawn shape) |
| `grounding/templates_rec.json` | JSON list of strings | question templates with `<image>` and `<expr>` |
| `preference/preference_train.json` | RLAIF-V `{{"idx", "question", "chosen", "rejected", "image_path" or "image"}}` | {counts["preference_pairs"]} pairs: chosen = correct description, rejected = an absent shape inserted or swapped in |
| `scenes.json` | ground truth | every image's objects (shape, colour, bbox) and whether its SFT description is noisy |

**Descriptions** are templated: "There are N objects." then one sentence per object in reading order (top row first,
left to right), e.g. "A red circle at the top left." Positions are the thirds of the image: top/middle/bottom x
left/center/right ("in the center", "on the left", "at the bottom right").

**Noise.** {counts["noisy_train_descriptions"]} of the {counts["train_images"]} training descriptions (noise_rate
{cfg.noise_rate}) mention an object that is not in the image, with the count including it; held-out descriptions, COCO
captions and preference `chosen` answers are always correct. `scenes.json` marks the noisy ones.

**Held-out split.** `sft/test.json`, `objhal_bench.jsonl`, the COCO val files and `grounding/rec_val.jsonl` use the
same {cfg.n_test} held-out images; the train files use the other {cfg.n_train}.
"""
