"""Small data files in the project's formats, shared by the tests: SFT items, preference pairs, COCO ground truth."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
QUESTION = "What is in the image?"
IMAGE_IDS = (11, 22, 33)
# Ground truth: image 11 has a dog, 22 a cat, 33 a dog and a sofa.
INSTANCES = {11: ["dog"], 22: ["cat"], 33: ["dog", "sofa"]}
SYNONYMS = "dog, dogs, puppy\ncat, cats, kitten\nsofa, couch\nbook, books\napple, apples\n"


def make_sft_files(root: Path, n: int = 8, long_no: bool = False) -> Path:
    """n one-turn yes/no items about the colour of a 56x56 image, images under root/images/color/ (`long_no`: the
    No answers name the colour, so answers differ in length)."""
    (root / "images" / "color").mkdir(parents=True, exist_ok=True)
    items = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (56, 56), COLORS[color]).save(root / "images" / "color" / f"{i}.png")
        asked = color if i % 2 == 0 else names[(i + 1) % len(names)]
        items.append(
            {
                "id": i,
                "image": f"images/color/{i}.png",
                "conversations": [
                    {"role": "user", "content": f"<image>\nIs the picture {asked}? Please answer yes or no."},
                    {
                        "role": "assistant",
                        "content": "Yes" if asked == color else f"No, it is {color}." if long_no else "No",
                    },
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(items))
    return path


def make_preference_file(root: Path, n: int = 16, base64_every: int = 4, name: str = "pref.json") -> Path:
    """n pairs about a 56x56 one-colour image: chosen names its colour, rejected another one. Every
    `base64_every`-th item carries the image as base64, the others as image_path under root/images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    items = []
    for i in range(n):
        color = names[i % len(names)]
        wrong = names[(i + 1 + i // len(names)) % len(names)]
        if wrong == color:
            wrong = names[(i + 2) % len(names)]
        image = Image.new("RGB", (56, 56), COLORS[color])
        item = {
            "idx": i,
            "question": QUESTION,
            "chosen": f"A {color} square.",
            "rejected": f"A {wrong} square.",
        }
        if base64_every and i % base64_every == 0:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            item["image"] = (
                base64.b64encode(buffer.getvalue()).decode() + " " * 1000
            )  # over the base64 length
        else:
            image.save(root / "images" / f"{i}.png")
            item["image_path"] = f"images/{i}.png"
        items.append(item)
    path = root / name
    path.write_text(json.dumps(items))
    return path


def write_coco(root: Path) -> Path:
    """The four COCO 2014 files CHAIR reads, with instances only (captions empty)."""
    names = sorted({n for objs in INSTANCES.values() for n in objs})
    categories = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    cat_id = {c["name"]: c["id"] for c in categories}
    annotations = [
        {"id": k, "image_id": imid, "category_id": cat_id[name]}
        for k, (imid, name) in enumerate((i, n) for i, objs in INSTANCES.items() for n in objs)
    ]
    images = [{"id": imid, "file_name": f"COCO_val2014_{imid:012d}.jpg"} for imid in IMAGE_IDS]
    empty = {"images": [], "annotations": [], "categories": categories}
    root.mkdir(parents=True, exist_ok=True)
    for split in ("val", "train"):
        instances = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"instances_{split}2014.json").write_text(json.dumps(instances if split == "val" else empty))
        (root / f"captions_{split}2014.json").write_text(json.dumps({"images": [], "annotations": []}))
    return root
