"""The SFT and preference data formats as conversations, for the model families behind `mllm.vlm` other than ours.

Our MiniCPM-V path tokenizes at open time (`data/sft.py`, `data/preference.py`: the processor knows every image's
placeholder length from the image header). transformers' processors expand image tokens from the pixels, so here an
item stays a conversation in our chat format (`{"role", "content": [PIL image, str, ...]}`) until the collator,
which calls the family's `vlm.prepare(..., with_labels=True)`: the chat template, the image tokens, the pixels and
labels on exactly the assistant tokens (`mllm.vlm.chat_labels`) are the family's own. The parsing, the checks at
open time (fields, image files and their headers, the pixel cap) and the record format are shared with our path.

A collated batch is `{"inputs": <the family's forward keywords>, "labels": [B, T]}` (preference: 2B rows, the B
chosen then the B rejected, plus `idx` and the reference log-probs); `mllm.train.forward` runs either layout.
A row longer than `max_length` is refused with its item (cutting it could cut an image's tokens, which the family's
model refuses), and reference log-probs whose token counts differ from the batch's labels are refused per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.preference import (
    PreferenceDataset,
    ReferenceLogps,
    _text_field,
    open_image,
    parse_inline_logps,
    reference_fields,
)
from mllm.data.sft import (
    attach_image_markers,
    find_image,
    image_size,
    normalise_messages,
    read_json_list,
)
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, open_image_header
from mllm.model.losses import IGNORE_INDEX
from mllm.processing.processor import IMAGE_MARKER, MLLMProcessor
from mllm.vlm import VLM, as_vlm


def marked_content(text: str, images: list[Image.Image], where: str) -> list[Any]:
    """A message text whose images are IMAGE_MARKERs + those images in order -> our content list (images and the
    text pieces between them, stripped; empty pieces dropped)."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{where}: {len(pieces) - 1} image markers but {len(images)} images")
    content: list[Any] = []
    for i, piece in enumerate(pieces):
        if i:
            content.append(images[i - 1])
        if piece.strip():
            content.append(piece.strip())
    return content


def conversation_of(
    messages: list[dict[str, str]], images: list[Image.Image], where: str
) -> list[dict[str, Any]]:
    """Messages with IMAGE_MARKERs (`attach_image_markers`) and the images in prompt order -> a conversation."""
    conversation, used = [], 0
    for message in messages:
        n = message["content"].count(IMAGE_MARKER)
        content = marked_content(message["content"], images[used : used + n], where)
        conversation.append({"role": message["role"], "content": content})
        used += n
    return conversation


def check_lengths(attention: torch.Tensor, ids: list[Any], max_length: int, source: str) -> None:
    """Refuse rows longer than `max_length` tokens, naming the data and the items."""
    lengths = attention.sum(dim=1).tolist()  # [B]
    over = [(ids[r % len(ids)], n) for r, n in enumerate(lengths) if n > max_length]
    if over:
        raise ValueError(
            f"{source}: items {[i for i, _ in over]} are {[n for _, n in over]} tokens long with the family's image tokens, "
            f"over --max-length {max_length}; shorten them or raise --max-length"
        )


def cpu_batch(
    vlm: VLM, conversations: list[list[dict[str, Any]]], ids: list[Any], source: str
) -> tuple[dict[str, Any], torch.Tensor]:
    """(the family's model inputs, labels [B, T]) of labelled conversations, on the CPU; a conversation the family
    refuses (e.g. several turns its template cannot label) is a ValueError naming the data file and the items."""
    try:
        batch = vlm.prepare(conversations, with_labels=True, device="cpu")
    except ValueError as exc:
        raise ValueError(f"{source}, items {ids}: {exc}") from exc
    assert batch.labels is not None
    return batch.inputs, batch.labels


class ConversationDataset(Dataset):
    """The SFT JSON format (`data/sft.py`) as conversations; `VLMCollator` batches them for a family's model."""

    def __init__(
        self,
        data_path: str | Path,
        image_folder: str | Path | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_image_pixels = max_image_pixels
        self.items: list[tuple[Any, list[dict[str, str]], list[Path]]] = []
        for index, raw in enumerate(read_json_list(self.data_path)):
            item_id = raw.get("id", index) if isinstance(raw, dict) else index
            where = f"{self.data_path}, item {item_id}"
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            messages, rel_paths = attach_image_markers(
                normalise_messages(raw, where), raw.get("image"), where
            )
            paths = [find_image(p, self.image_folder, self.data_path.parent, where) for p in rel_paths]
            for path in paths:
                image_size(path, where, max_image_pixels)  # the header: unreadable, bomb or over the cap
            self.items.append((item_id, messages, paths))
        if not self.items:
            raise ValueError(f"{self.data_path}: no items")

    @property
    def ids(self) -> list[Any]:
        return [item_id for item_id, _, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_id, messages, paths = self.items[index]
        where = f"{self.data_path}, item {item_id}"
        images = []
        for path in paths:
            with open_image_header(path, f"{where}: image {path}", self.max_image_pixels) as image:
                images.append(image.convert("RGB"))
        return {"id": item_id, "conversation": conversation_of(messages, images, where)}


class VLMCollator:
    """SFT samples -> `{"inputs", "labels"}` through the family's `prepare` (right-padded, labels on the assistant
    tokens); rows over `max_length` are refused."""

    def __init__(self, vlm: VLM, max_length: int, source: str = "SFT data") -> None:
        self.vlm = vlm
        self.max_length = max_length
        self.source = source

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["id"] for e in examples]
        inputs, labels = cpu_batch(self.vlm, [e["conversation"] for e in examples], ids, self.source)
        check_lengths(inputs["attention_mask"], ids, self.max_length, self.source)
        return {"inputs": inputs, "labels": labels}


class ConversationPairs(PreferenceDataset):
    """RLAIF-V preference pairs (`data/preference.py`) as chosen / rejected conversations for a family's model.

    The items are read and checked as for MiniCPM-V (fields, idx, image headers, inline `logps`); the token counts
    of reference log-probs are checked against the collated labels, per pair (`collator`)."""

    def __init__(
        self,
        data_path: str | Path,
        vlm: VLM,
        image_folder: str | Path | None = None,
        max_length: int = 2048,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.vlm = vlm
        super().__init__(data_path, vlm.processor, image_folder, max_length, max_image_pixels)

    def encode(self, raw: dict[str, Any], idx: Any, where: str) -> ConversationPair:
        """The item's texts, image source and inline reference; only the image header is read."""
        question = _text_field(raw, "question", where)
        responses = {name: _text_field(raw, name, where) for name in ("chosen", "rejected")}
        source = self._image_source(raw, where)
        open_image(source, where, self.max_image_pixels).close()  # the header: unreadable, bomb, over the cap
        reference = parse_inline_logps(raw["logps"], where) if raw.get("logps") is not None else None
        return ConversationPair(idx, question, responses["chosen"], responses["rejected"], source, reference)

    def set_reference(self, records: dict[Any, ReferenceLogps], source: str) -> None:
        """Attach reference log-probs (their token counts are checked by the collator, against the labels)."""
        self.check_covered(records, source)
        for pair in self.pairs:
            pair.reference = records[pair.idx]

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        with open_image(pair.image, f"{self.data_path}, idx {pair.idx}", self.max_image_pixels) as image:
            rgb = image.convert("RGB")

        def conversation(response: str) -> list[dict[str, Any]]:
            return [
                {"role": "user", "content": [rgb, pair.question]},
                {"role": "assistant", "content": response},
            ]

        return {
            "idx": pair.idx,
            "chosen": conversation(pair.chosen),
            "rejected": conversation(pair.rejected),
            "reference": pair.reference,
        }

    def collator(self, pad_token_id: int | None = None):
        """The pairs' collator (the family's processor pads: `pad_token_id` is not used)."""
        return PairCollator(self.vlm, self.max_length, str(self.data_path))


@dataclass
class ConversationPair:
    """One preference item of `ConversationPairs`."""

    idx: Any
    """The item's `idx` (its list position when the item has none)."""
    question: str
    chosen: str
    rejected: str
    image: str | Path
    """A file path, or the base64 string itself."""
    reference: ReferenceLogps | None = None
    """Reference log-probs, when known."""


class PairCollator:
    """Pairs -> one batch of 2B rows (the B chosen, then the B rejected) through the family's `prepare`, with `idx`
    and the reference log-probs as `preference_collator` writes them; a pair whose reference token counts differ
    from its labels is refused (computed for other data, tokenizer or model family)."""

    def __init__(self, vlm: VLM, max_length: int, source: str) -> None:
        self.vlm = vlm
        self.max_length = max_length
        self.source = source

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["idx"] for e in examples]
        conversations = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
        inputs, labels = cpu_batch(self.vlm, conversations, ids, self.source)
        check_lengths(inputs["attention_mask"], ids, self.max_length, self.source)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()  # [2B]
        n = len(examples)
        for b, e in enumerate(examples):
            reference = e["reference"]
            if reference is None:
                continue
            expected = (reference.chosen_tokens, reference.rejected_tokens)
            if (counts[b], counts[n + b]) != expected:
                raise ValueError(
                    f"{self.source}: idx {e['idx']}: the reference log-probs cover {expected[0]} chosen / "
                    f"{expected[1]} rejected tokens but this model's labels give {counts[b]} / {counts[n + b]}; "
                    "they were computed for other data or another model; recompute them with `mllm logp`"
                )
        return {"idx": ids, "inputs": inputs, "labels": labels, **reference_fields(examples, ids)}


def preference_data(
    data_path: str | Path,
    model: Any,
    processor: Any,
    image_folder: str | Path | None = None,
    max_length: int = 2048,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> PreferenceDataset:
    """The preference dataset for any family: ours tokenized at open time (`PreferenceDataset`), the others as
    conversations (`ConversationPairs`)."""
    if isinstance(processor, MLLMProcessor):
        return PreferenceDataset(data_path, processor, image_folder, max_length, max_image_pixels)
    return ConversationPairs(data_path, as_vlm(model, processor), image_folder, max_length, max_image_pixels)
