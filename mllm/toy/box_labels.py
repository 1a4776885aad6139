"""Per-token labels from COCO-format instance boxes: the data of `mllm train vision`.

Every vision token of an image (one per patch of the whole, unsliced image as the image processor resizes it) gets
the category of the smallest annotated box that contains the token's centre, or `background` when no box does, and
that box's corners as fractions of the image [x1, y1, x2, y2]; when an annotation key such as the toy world's
`"color"` is named, the token also gets that value of the same box.

    dataset = BoxLabelDataset("coco/annotations/instances_train2014.json", "world", processor.image_processor,
                              attribute="color")
    item = dataset[0]  # {"pixel_values": [3, p, h*w*p], "tgt_sizes": (h, w), "category_labels": [h*w],
                       #  "attribute_labels": [h*w], "box_labels": [h*w, 4]}
    batch = box_label_collator([dataset[0], dataset[1]])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mllm.io import open_image
from mllm.processing.image_processing import MLLMImageProcessor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LabelledBox:
    """One annotation: [x, y, w, h] in the image's pixels (COCO), its category index and attribute index."""

    bbox: tuple[float, float, float, float]
    category: int
    attribute: int | None


def token_box_labels(
    boxes: list[LabelledBox],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    background: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(category [h*w], attribute [h*w], box [h*w, 4]) labels per token (row-major) of an h x w grid laid over a
    W x H image; the box is the token's box as fractions of the image [x1, y1, x2, y2] (zeros outside every box).

    Token (r, c) covers the image from (c/w*W, r/h*H) to ((c+1)/w*W, (r+1)/h*H); its centre decides. Where boxes
    overlap, the smaller box wins (an object drawn on top of a larger one). `background` gives the two labels of a
    token outside every box (and the attribute label of a box without an attribute).
    """
    h, w = grid
    width, height = image_size
    centre_y = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h  # [h]
    centre_x = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w  # [w]
    category = torch.full((h, w), background[0], dtype=torch.long)
    attribute = torch.full((h, w), background[1], dtype=torch.long)
    corners = torch.zeros(h, w, 4)
    for box in sorted(boxes, key=lambda b: -b.bbox[2] * b.bbox[3]):  # largest first: smaller boxes overwrite
        x, y, bw, bh = box.bbox
        inside = ((centre_y >= y) & (centre_y < y + bh))[:, None] & ((centre_x >= x) & (centre_x < x + bw))[
            None
        ]
        category[inside] = box.category
        attribute[inside] = background[1] if box.attribute is None else box.attribute
        corners[inside] = torch.tensor([x / width, y / height, (x + bw) / width, (y + bh) / height])
    return category.flatten(), attribute.flatten(), corners.reshape(h * w, 4)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class BoxLabelDataset(Dataset):
    """COCO instances file + image folder -> whole-image patch strips with per-token labels.

    Category labels are 0..C-1 in the order of the file's `categories`, C = background. With `attribute`, the
    attribute labels are 0..A-1 over the sorted values that key takes in the file, A = background (or no value).
    Every record is checked when the dataset is opened; an error names the file, the record and the field.
    """

    def __init__(
        self,
        instances: str | Path,
        image_folder: str | Path,
        image_processor: MLLMImageProcessor,
        attribute: str | None = None,
    ):
        self.path = Path(instances)
        self.image_folder = Path(image_folder)
        self.image_processor = image_processor
        self.attribute = attribute
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: cannot read a COCO instances file ({exc})") from exc
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
                raise ValueError(f"{self.path}: field '{key}' must be a list (a COCO instances file)")
        self.category_names = [
            self._field(c, "name", str, f"categories[{i}]") for i, c in enumerate(data["categories"])
        ]
        category_index = {
            self._field(c, "id", int, f"categories[{i}]"): i for i, c in enumerate(data["categories"])
        }
        self.attribute_values = (
            sorted({str(a[attribute]) for a in data["annotations"] if attribute in a}) if attribute else []
        )
        attribute_index = {v: i for i, v in enumerate(self.attribute_values)}
        self.images: list[dict[str, Any]] = []
        image_row: dict[int, int] = {}
        for i, record in enumerate(data["images"]):
            where = f"images[{i}]"
            image_id = self._field(record, "id", int, where)
            self._field(record, "file_name", str, where)
            image_row[image_id] = len(self.images)
            self.images.append(record)
        self.boxes: list[list[LabelledBox]] = [[] for _ in self.images]
        for i, record in enumerate(data["annotations"]):
            where = f"annotations[{i}]"
            image_id = self._field(record, "image_id", int, where)
            if image_id not in image_row:
                raise ValueError(f"{self.path}: {where} field 'image_id': no image with id {image_id}")
            category = self._field(record, "category_id", int, where)
            if category not in category_index:
                raise ValueError(f"{self.path}: {where} field 'category_id': no category with id {category}")
            bbox = record.get("bbox")
            if (
                not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox))
                or min(bbox[2:]) <= 0
            ):
                raise ValueError(
                    f"{self.path}: {where} field 'bbox' must be [x, y, w, h] with w, h > 0, got {bbox!r}"
                )
            value = record.get(attribute) if attribute else None
            self.boxes[image_row[image_id]].append(
                LabelledBox(
                    tuple(float(v) for v in bbox),
                    category_index[category],
                    None if value is None else attribute_index[str(value)],
                )
            )
        if not self.images:
            raise ValueError(f"{self.path}: field 'images' is empty")
        if attribute and not self.attribute_values:
            raise ValueError(f"{self.path}: no annotation has the attribute field '{attribute}'")

    def _field(self, record: Any, key: str, kind: type, where: str) -> Any:
        value = record.get(key) if isinstance(record, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            kind_name = {int: "an integer", str: "a string"}.get(kind, kind.__name__)
            raise ValueError(f"{self.path}: {where} field '{key}' must be {kind_name}, got {value!r}")
        return value

    @property
    def num_categories(self) -> int:
        """Categories plus background."""
        return len(self.category_names) + 1

    @property
    def num_attributes(self) -> int:
        """Attribute values plus background (1 when no attribute is used)."""
        return len(self.attribute_values) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.images[index]
        path = self.image_folder / record["file_name"]
        image = open_image(
            path, f"{self.path}: images[{index}] field 'file_name': cannot open {path}"
        )  # a ValueError
        whole = self.image_processor.get_sliced_images(image, max_slice_nums=1)[0]
        strip, grid = self.image_processor.to_patch_strip(whole)
        category, attribute, corners = token_box_labels(
            self.boxes[index], grid, image.size, (len(self.category_names), len(self.attribute_values))
        )
        return {
            "pixel_values": strip,
            "tgt_sizes": grid,
            "category_labels": category,
            "attribute_labels": attribute,
            "box_labels": corners,
        }


def box_label_collator(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> {"pixel_values": list of strips, "tgt_sizes": [N, 2] int32, "category_labels" and
    "attribute_labels": [N, max h*w] long, IGNORE_INDEX past each image's tokens, "box_labels": [N, max h*w, 4]}."""
    length = max(len(item["category_labels"]) for item in items)
    batch: dict[str, Any] = {
        "pixel_values": [item["pixel_values"] for item in items],
        "tgt_sizes": torch.tensor([item["tgt_sizes"] for item in items], dtype=torch.int32),
    }
    for key in ("category_labels", "attribute_labels"):
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for i, item in enumerate(items):
            labels[i, : len(item[key])] = item[key]
        batch[key] = labels
    boxes = torch.zeros(len(items), length, 4)
    for i, item in enumerate(items):
        boxes[i, : len(item["box_labels"])] = item["box_labels"]
    batch["box_labels"] = boxes
    return batch
