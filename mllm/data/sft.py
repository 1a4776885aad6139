"""Supervised fine-tuning data: the SFT JSON format -> token ids, labels on answer tokens, image slices.

An item of the SFT format (REFERENCE.md section 2):
    {"id": 7, "image": "images/color/0007.png",            # or {"<image_00>": path, "<image_01>": path}
     "conversations": [{"role": "user", "content": "<image>\\nIs the circle red? Please answer yes or no."},
                       {"role": "assistant", "content": "Yes"}]}

The prompt is built by the processor, as for inference (`MLLMProcessor.encode_training`: the tokenizer's chat template
renders the conversation and the image processor writes each image's placeholder, with the processor's slicing
settings). Only the assistant's tokens and their closing `<|im_end|>` are targets; everything else is IGNORE_INDEX. Token ids, labels and image bounds are computed once, when the dataset is opened,
from the image headers alone (sizes, no pixel decoding), so that a broken item fails at once with its file, id and
reason, and over-long items are truncated or skipped before training starts (under DDP each process tokenizes its
share and the processes swap them). Pixels are read in `__getitem__`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mllm.data.ranks import map_across_ranks
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, RecordError, open_image_header
from mllm.model.losses import IGNORE_INDEX
from mllm.processing.processor import IMAGE_MARKER, MLLMProcessor

logger = logging.getLogger(__name__)

SFT_IMAGE_TOKEN = "<image>"
"""How an image is marked in the content of the SFT format (single-image items)."""

_ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "user": "user",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class EncodedItem:
    """One conversation, tokenized; pixels are loaded later."""

    input_ids: torch.Tensor
    """[T] long."""
    labels: torch.Tensor
    """[T] long, IGNORE_INDEX outside assistant answers."""
    image_bound: torch.Tensor
    """[n, 2] long: [start, end) of each slice's feature run."""
    image_paths: list[Path]
    """The item's images, in the order of their placeholders."""
    n_slices: int
    """How many slices of those images the kept tokens use (truncation may drop trailing slices)."""

    def to_lists(self) -> tuple[list[int], list[int], list[list[int]], list[str], int]:
        """The item as plain lists (what `map_across_ranks` sends between processes); `from_lists` undoes it."""
        paths = [str(p) for p in self.image_paths]
        return self.input_ids.tolist(), self.labels.tolist(), self.image_bound.tolist(), paths, self.n_slices

    @classmethod
    def from_lists(cls, lists: tuple[list[int], list[int], list[list[int]], list[str], int]) -> EncodedItem:
        input_ids, labels, bound, paths, n_slices = lists
        return cls(
            torch.tensor(input_ids, dtype=torch.long),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(bound, dtype=torch.long).view(-1, 2),  # [n, 2], also for n = 0
            [Path(p) for p in paths],
            n_slices,
        )


def read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return data


def normalise_messages(item: dict[str, Any], where: str) -> list[dict[str, str]]:
    """`conversations` with role/content (or LLaVA's from/value) -> [{"role", "content"}]."""
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(conversations):
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in _ROLE_ALIASES or not isinstance(content, str):
            raise ValueError(
                f"{where}: conversations[{i}] needs a known 'role' and a string 'content', got {turn!r:.100}"
            )
        messages.append({"role": _ROLE_ALIASES[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return messages


def attach_image_markers(
    messages: list[dict[str, str]], image_field: Any, where: str
) -> tuple[list[dict[str, str]], list[str]]:
    """Replace the SFT format's image marks by IMAGE_MARKER; returns the messages and image paths in prompt order.

    A single image without a `<image>` mark goes in front of the first user message (as MiniCPM-V does)."""
    if image_field is None:
        marked = next((i for i, m in enumerate(messages) if SFT_IMAGE_TOKEN in m["content"]), None)
        if marked is not None:
            raise ValueError(
                f"{where}: conversations[{marked}].content has an {SFT_IMAGE_TOKEN!r} mark but the item has no "
                "'image' field"
            )
        return messages, []
    messages = [dict(m) for m in messages]
    if isinstance(image_field, str):
        marks = {SFT_IMAGE_TOKEN: image_field}
        if not any(SFT_IMAGE_TOKEN in m["content"] for m in messages):
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError(f"{where}: an image is given but there is no user turn to put it in")
            first_user["content"] = f"{SFT_IMAGE_TOKEN}\n{first_user['content']}"
    elif isinstance(image_field, dict):
        marks = dict(image_field)
    else:
        raise ValueError(f"{where}: field 'image' must be a path or a {{'<image_00>': path}} dict")
    paths: list[str] = []
    for m in messages:
        text, out, cursor = m["content"], [], 0
        # Walk the marks in order of appearance so that image i is the i-th placeholder. The replacement
        # (IMAGE_MARKER) itself contains "<image>", hence the cursor rather than repeated search-and-replace.
        while True:
            hits = [(text.find(mark, cursor), mark) for mark in marks if text.find(mark, cursor) >= 0]
            if not hits:
                break
            pos, mark = min(hits)
            if m["role"] == "assistant":
                raise ValueError(f"{where}: image mark {mark!r} in an assistant turn")
            paths.append(marks[mark])
            out.append(text[cursor:pos] + IMAGE_MARKER)
            cursor = pos + len(mark)
        m["content"] = "".join(out) + text[cursor:]
    if isinstance(image_field, dict):
        unused = set(marks) - {mark for mark, path in marks.items() if path in paths}
        if unused:
            raise ValueError(f"{where}: images {sorted(unused)} are never referenced in the conversation")
    if isinstance(image_field, str) and len(paths) != 1:
        raise ValueError(f"{where}: one image but {len(paths)} {SFT_IMAGE_TOKEN!r} marks in the conversation")
    return messages, paths


def encode_item(
    processor: MLLMProcessor,
    messages: list[dict[str, str]],
    sizes: list[tuple[int, int]],
    where: str,
    image_paths: list[Path] | None = None,
) -> EncodedItem:
    """Messages whose images are IMAGE_MARKERs + each image's (W, H) -> an EncodedItem with labels on the targets
    the processor marks (`MLLMProcessor.encode_training`)."""
    input_ids, targets, bound = processor.encode_training(messages, sizes, where)
    labels = input_ids.masked_fill(~targets, IGNORE_INDEX)
    return EncodedItem(input_ids, labels, bound, image_paths or [], len(bound))


def find_image(path: str, image_folder: Path | None, json_dir: Path, where: str) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = (image_folder if image_folder is not None else json_dir) / candidate
    if not candidate.is_file():
        raise ValueError(f"{where}: image file not found: {candidate}")
    return candidate


def image_size(path: Path, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(W, H) from the file header (PIL does not decode the pixels for this); an unreadable image, a decompression
    bomb or one over `max_pixels` is a ValueError naming `where` and the file."""
    try:
        with open_image_header(path, f"{where}: image {path}", max_pixels) as image:
            return image.size
    except RecordError as exc:
        raise ValueError(str(exc)) from exc


def truncate(item: EncodedItem, max_length: int) -> EncodedItem | None:
    """Cut an item to max_length tokens without cutting through an image's feature run.

    The cut moves back to the opening tag of the first slice that would not fit whole (its pixels are dropped).
    Returns None when no target token would remain."""
    if len(item.input_ids) <= max_length:
        return item
    cut = max_length
    keep = item.image_bound[:, 1] < cut  # the closing tag must fit too
    if not bool(keep.all()):
        first_dropped = int(torch.nonzero(~keep)[0, 0])
        cut = min(cut, int(item.image_bound[first_dropped, 0]) - 1)
        keep[first_dropped:] = False
    labels = item.labels[:cut]
    if not bool((labels[1:] != IGNORE_INDEX).any()):
        return None
    n_keep = int(keep.sum())
    return EncodedItem(item.input_ids[:cut], labels, item.image_bound[:n_keep], item.image_paths, n_keep)


def _lists_or_none(item: EncodedItem | None) -> tuple | None:
    return None if item is None else item.to_lists()


def _item_or_none(lists: tuple | None) -> EncodedItem | None:
    return None if lists is None else EncodedItem.from_lists(lists)


class SupervisedDataset(Dataset):
    """The SFT JSON format as model inputs: `input_ids`, `labels`, `position_ids`, `image_bound`, `pixel_values`,
    `tgt_sizes` (one sample each; `data_collator` batches them).

    Items longer than `max_length` are truncated after their last image placeholder when a target token remains,
    otherwise skipped; the number skipped is logged once and kept in `n_skipped`.

    Under an initialised process group the processes tokenize the file together (`map_across_ranks`): every
    process of the group must open it, as every process of a Trainer run does.
    """

    def __init__(
        self,
        data_path: str | Path,
        processor: MLLMProcessor,
        image_folder: str | Path | None = None,
        max_length: int = 2048,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.data_path = Path(data_path)
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.raw = read_json_list(self.data_path)
        self.items: list[EncodedItem] = []
        self.ids: list[Any] = []
        self.n_skipped = 0
        self._images: dict[str, tuple[Path, tuple[int, int]]] = {}  # path as written -> (file, (W, H))
        # under DDP each process tokenizes its share and the processes swap them (`map_across_ranks`)
        encoded_items = map_across_ranks(len(self.raw), self.encode_index, _lists_or_none, _item_or_none)
        for index, encoded in enumerate(encoded_items):
            if encoded is None:
                self.n_skipped += 1
                continue
            self.items.append(encoded)
            self.ids.append(self.raw[index].get("id", index))
        if self.n_skipped:
            logger.warning(
                "%s: skipped %d of %d items longer than max_length=%d with no answer token left after truncation",
                self.data_path,
                self.n_skipped,
                len(self.raw),
                max_length,
            )
        if not self.items:
            raise ValueError(f"{self.data_path}: no usable item (all {len(self.raw)} were empty or skipped)")

    def encode_index(self, index: int) -> EncodedItem | None:
        """Item `index` of the file tokenized and cut to `max_length` (None: no target token would be left)."""
        raw = self.raw[index]
        where = f"{self.data_path}, item {raw.get('id', index) if isinstance(raw, dict) else index}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        return truncate(self.encode(raw, where), self.max_length)

    def encode(self, raw: dict[str, Any], where: str) -> EncodedItem:
        """Tokenize one item; only image headers are read, once per image file (most images have several items)."""
        messages = normalise_messages(raw, where)
        messages, rel_paths = attach_image_markers(messages, raw.get("image"), where)
        for p in rel_paths:
            if p not in self._images:
                path = find_image(p, self.image_folder, self.data_path.parent, where)
                self._images[p] = path, image_size(path, where, self.max_image_pixels)
        paths = [self._images[p][0] for p in rel_paths]
        sizes = [self._images[p][1] for p in rel_paths]
        return encode_item(self.processor, messages, sizes, where, paths)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample (image placeholders included), for a length-grouped sampler."""
        return [len(item.input_ids) for item in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        strips: list[torch.Tensor] = []
        sizes = []
        for path in item.image_paths:
            with open_image_header(path, f"{self.data_path}: image {path}", self.max_image_pixels) as image:
                image_strips, tgt = self.processor.image_processor.preprocess_image(image, where=str(path))
            strips.extend(image_strips)
            sizes.append(tgt)
        tgt_sizes = torch.cat(sizes) if sizes else torch.zeros(0, 2, dtype=torch.int32)
        assert len(strips) >= item.n_slices, (
            "image slices disagree with the placeholders built from the headers"
        )
        return {
            "input_ids": item.input_ids,
            "labels": item.labels,
            "position_ids": torch.arange(len(item.input_ids), dtype=torch.long),
            "image_bound": item.image_bound,
            "pixel_values": strips[: item.n_slices],
            "tgt_sizes": tgt_sizes[: item.n_slices],
        }


def data_collator(
    examples: list[dict[str, Any]], pad_token_id: int = 0, max_length: int | None = None
) -> dict[str, Any]:
    """Right-pad a list of dataset samples into a training batch.

    `input_ids` are padded with `pad_token_id`, `labels` with IGNORE_INDEX, `position_ids` with 0; `attention_mask` comes
    from the real lengths. With `max_length`, samples are cut first without cutting an image placeholder (slices
    that no longer fit are dropped with their pixels). Image fields stay per-sample lists."""
    if max_length is not None:
        examples = [_truncate_sample(e, max_length) for e in examples]
    length = max(len(e["input_ids"]) for e in examples)
    batch_size = len(examples)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)  # [B, T]
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((batch_size, length), dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # [B, T]
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = e["input_ids"]
        labels[b, :n] = e["labels"]
        position_ids[b, :n] = e["position_ids"]
        attention_mask[b, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "image_bound": [e["image_bound"] for e in examples],
        "pixel_values": [e["pixel_values"] for e in examples],
        "tgt_sizes": [e["tgt_sizes"] for e in examples],
    }


PER_SAMPLE_LISTS = ("image_bound", "pixel_values", "tgt_sizes")
"""The fields of a `data_collator` batch that hold one entry per sample instead of a [B, T] tensor."""


def split_by_length(batch: dict[str, Any], pieces: int) -> list[dict[str, Any]]:
    """A `data_collator` batch cut into up to `pieces` batches of samples of similar length, each trimmed to its own
    longest sample.

    The samples are sorted by length and split into groups of (nearly) equal size. With right padding and causal
    attention a sample's logits do not depend on the padding after it, so the pieces give the batch's logits at
    every real position; the padded positions that the whole batch would compute are skipped. For the SFT losses
    add the pieces' sums (`mllm.model.losses.token_loss_sum`, `sample_loss_sum`) before dividing."""
    if pieces < 1:
        raise ValueError(f"pieces must be at least 1, got {pieces}")
    unknown = set(batch) - {"input_ids", "labels", "position_ids", "attention_mask", *PER_SAMPLE_LISTS}
    if unknown:
        raise ValueError(f"split_by_length takes data_collator batches; unknown fields {sorted(unknown)}")
    mask = batch["attention_mask"]  # [B, T]
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        raise ValueError("split_by_length needs right-padded samples (attention_mask 1...1 0...0)")
    lengths = mask.sum(-1)  # [B]
    order = torch.argsort(lengths, stable=True)
    out = []
    for rows in torch.tensor_split(order, min(pieces, len(order))):
        longest = int(lengths[rows].max())
        piece = {
            name: batch[name][rows, :longest]  # [b, longest]
            for name in ("input_ids", "labels", "position_ids", "attention_mask")
            if name in batch
        }
        for name in PER_SAMPLE_LISTS:
            if name in batch:
                piece[name] = [batch[name][i] for i in rows.tolist()]
        out.append(piece)
    return out


def _truncate_sample(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    item = EncodedItem(
        example["input_ids"], example["labels"], example["image_bound"], [], len(example["image_bound"])
    )
    cut = truncate(item, max_length)
    if cut is None:  # no target left: keep the context so the batch shape stays valid; it contributes no loss
        cut = truncate(
            EncodedItem(item.input_ids, item.input_ids, item.image_bound, [], item.n_slices), max_length
        )
        assert cut is not None
        cut.labels = torch.full_like(cut.labels, IGNORE_INDEX)
    n = len(cut.input_ids)
    return {
        **example,
        "input_ids": cut.input_ids,
        "labels": cut.labels,
        "position_ids": example["position_ids"][:n],
        "image_bound": cut.image_bound,
        "pixel_values": example["pixel_values"][: cut.n_slices],
        "tgt_sizes": example["tgt_sizes"][: cut.n_slices],
    }
