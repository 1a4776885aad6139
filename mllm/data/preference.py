"""Preference data (RLAIF-V format) -> pairs of chosen/rejected sequences sharing one prompt and one image.

An item (REFERENCE.md section 2):
    {"idx": 17, "question": "Describe the image.", "chosen": "A red square.", "rejected": "A blue square.",
     "image": "<base64>"}                      # or "image_path": "images/17.png" (relative to --image-folder,
                                               #  else to the JSON file's folder)
     optional "logps": [win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp, rej_per_token_logp]

Both sequences are the conversation [user: "<image>\\n" + question, assistant: response], tokenized by the same
code as SFT (the processor's `encode_training`), so the prompt the policy is aligned on is exactly the prompt it was
fine-tuned and is queried with. Labels cover the response and its `<|im_end|>` only. The image's pixels are loaded
once per item; the collator puts all chosen rows first, then all rejected rows, and lists each image once with a
row -> image index, so the trainer runs the vision tower once per pair.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.sft import (
    IGNORE_INDEX,
    EncodedItem,
    attach_image_markers,
    encode_item,
    find_image,
    read_json_list,
    truncate,
)
from mllm.io import DEFAULT_MAX_IMAGE_PIXELS, is_base64_image, open_image_header
from mllm.processing.processor import MLLMProcessor

logger = logging.getLogger(__name__)


@dataclass
class ReferenceLogps:
    """Reference-model log-probabilities of one pair (from `mllm logp` or an item's inline `logps`)."""

    chosen_logp: float
    """Sum over the chosen response's tokens of log p_ref."""
    chosen_avg_logp: float
    """chosen_logp / chosen_tokens."""
    chosen_tokens: int
    """Number of chosen response tokens (labels != -100 after the causal shift)."""
    rejected_logp: float
    """Sum over the rejected response's tokens of log p_ref."""
    rejected_avg_logp: float
    """rejected_logp / rejected_tokens."""
    rejected_tokens: int
    """Number of rejected response tokens."""


@dataclass
class PreferencePair:
    """One item, tokenized; pixels are loaded in `__getitem__`."""

    idx: Any
    """The item's `idx` (its list position when the item has none)."""
    chosen: EncodedItem
    """Prompt + chosen response; labels on the response."""
    rejected: EncodedItem
    """Prompt + rejected response; same prompt tokens and image bounds as `chosen`."""
    image: str | Path
    """A file path, or the base64 string itself."""
    reference: ReferenceLogps | None = None
    """Reference log-probs, when known."""


def response_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a log-prob: labels != -100 after the causal shift (what `get_batch_logps` counts)."""
    return int((labels[1:] != IGNORE_INDEX).sum())


def open_image(source: str | Path, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A lazily opened PIL image (the header only, until pixels are asked for) within the pixel cap; the caller
    closes it. An unreadable image, a decompression bomb or one over the cap is a ValueError naming `where`."""
    if isinstance(source, Path):
        return open_image_header(source, f"{where}: image {source}", max_pixels)
    try:
        raw = base64.b64decode(source, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: field 'image' is broken base64 ({exc})") from exc
    return open_image_header(io.BytesIO(raw), f"{where}: field 'image'", max_pixels)


def _text_field(raw: dict[str, Any], name: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field '{name}' must be a non-empty string, got {value!r:.60}")
    return value


def parse_inline_logps(value: Any, where: str) -> ReferenceLogps:
    """RLAIF-V's `logps` field: (win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp,
    rej_per_token_logp) -> ReferenceLogps (token counts from the per-token lists)."""
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise ValueError(f"{where}: field 'logps' must be a list of 6 entries (RLAIF-V layout)")
    win, win_avg, win_tok, rej, rej_avg, rej_tok = value
    if not isinstance(win_tok, list) or not isinstance(rej_tok, list):
        raise ValueError(f"{where}: field 'logps': entries 3 and 6 must be per-token lists")
    try:
        return ReferenceLogps(
            float(win), float(win_avg), len(win_tok), float(rej), float(rej_avg), len(rej_tok)
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: field 'logps' holds non-numbers ({exc})") from exc


class PreferenceDataset(Dataset):
    """RLAIF-V preference JSON as (chosen, rejected) pairs; `preference_collator` batches them.

    Pairs whose prompt is so long that no response token fits in `max_length` are skipped (counted in
    `n_skipped`); responses are truncated otherwise. `ids` lists the kept items' idx in order.
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
        self.pairs: list[PreferencePair] = []
        self.n_skipped = 0
        seen: set[Any] = set()
        raw_items = read_json_list(self.data_path)
        for position, raw in enumerate(raw_items):
            if not isinstance(raw, dict):
                raise ValueError(f"{self.data_path}, item {position}: expected a JSON object")
            idx = raw.get("idx", position)
            where = f"{self.data_path}, idx {idx}"
            if not isinstance(idx, (int, str)) or isinstance(idx, bool):
                raise ValueError(f"{where}: field 'idx' must be an integer or a string")
            if idx in seen:
                raise ValueError(f"{where}: field 'idx' is duplicated (each item needs its own idx)")
            seen.add(idx)
            pair = self.encode(raw, idx, where)
            if pair is None:
                self.n_skipped += 1
                continue
            self.pairs.append(pair)
        if self.n_skipped:
            logger.warning(
                "%s: skipped %d of %d pairs whose prompt leaves no response token within max_length=%d",
                self.data_path,
                self.n_skipped,
                len(raw_items),
                max_length,
            )
        if not self.pairs:
            raise ValueError(f"{self.data_path}: no usable preference pair (of {len(raw_items)} items)")

    @property
    def ids(self) -> list[Any]:
        return [pair.idx for pair in self.pairs]

    def _image_source(self, raw: dict[str, Any], where: str) -> str | Path:
        if "image_path" in raw:
            if not isinstance(raw["image_path"], str):
                raise ValueError(f"{where}: field 'image_path' must be a string path")
            return find_image(raw["image_path"], self.image_folder, self.data_path.parent, where)
        value = raw.get("image")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: field 'image' (base64) or 'image_path' is required")
        if is_base64_image(value):
            return value
        return find_image(value, self.image_folder, self.data_path.parent, where)

    def encode(self, raw: dict[str, Any], idx: Any, where: str) -> PreferencePair | None:
        """Tokenize both sequences of one item from the image header; None when nothing fits max_length."""
        question = _text_field(raw, "question", where)
        responses = {name: _text_field(raw, name, where) for name in ("chosen", "rejected")}
        source = self._image_source(raw, where)
        with open_image(source, where, self.max_image_pixels) as image:
            size = image.size
        encoded = {}
        for name, response in responses.items():
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
            messages, _ = attach_image_markers(messages, "image", where)
            encoded[name] = truncate(encode_item(self.processor, messages, [size], where), self.max_length)
        chosen, rejected = encoded["chosen"], encoded["rejected"]
        if chosen is None or rejected is None:
            return None
        if not torch.equal(chosen.image_bound, rejected.image_bound):
            raise ValueError(f"{where}: chosen and rejected do not share the image placeholder")
        reference = parse_inline_logps(raw["logps"], where) if raw.get("logps") is not None else None
        pair = PreferencePair(idx, chosen, rejected, source, reference)
        if reference is not None:
            check_token_counts(pair, reference, f"{self.data_path}: field 'logps'")
        return pair

    def set_reference(self, records: dict[Any, ReferenceLogps], source: str) -> None:
        """Attach reference log-probs; every pair needs one with matching token counts."""
        missing = [pair.idx for pair in self.pairs if pair.idx not in records]
        if missing:
            raise ValueError(
                f"{source}: no reference log-probs for {len(missing)} items of {self.data_path} "
                f"(first idx: {missing[:5]}); recompute them with `mllm logp`"
            )
        for pair in self.pairs:
            check_token_counts(pair, records[pair.idx], source)
        for pair in self.pairs:
            pair.reference = records[pair.idx]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        where = f"{self.data_path}, idx {pair.idx}"
        with open_image(pair.image, where, self.max_image_pixels) as image:
            strips, tgt_sizes = self.processor.image_processor.preprocess_image(image, where=where)
        n = pair.chosen.n_slices
        return {
            "idx": pair.idx,
            "chosen_input_ids": pair.chosen.input_ids,
            "chosen_labels": pair.chosen.labels,
            "rejected_input_ids": pair.rejected.input_ids,
            "rejected_labels": pair.rejected.labels,
            "image_bound": pair.chosen.image_bound,
            "pixel_values": strips[:n],
            "tgt_sizes": tgt_sizes[:n],
            "reference": pair.reference,
        }


def check_token_counts(pair: PreferencePair, reference: ReferenceLogps, source: str) -> None:
    """Refuse reference log-probs computed on other tokens than this pair's (other data, tokenizer, max_length)."""
    got = (response_tokens(pair.chosen.labels), response_tokens(pair.rejected.labels))
    expected = (reference.chosen_tokens, reference.rejected_tokens)
    if got != expected:
        raise ValueError(
            f"{source}: idx {pair.idx}: the reference log-probs cover {expected[0]} chosen / {expected[1]} "
            f"rejected tokens but this data gives {got[0]} / {got[1]}; they were computed for other data, "
            "tokenizer or --max-length; recompute them with `mllm logp`"
        )


def preference_collator(examples: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Pairs -> one right-padded batch of 2B rows: the B chosen rows, then the B rejected rows.

    Images are listed once per pair (`pixel_values`, `tgt_sizes` have B entries) and `image_index` [2B] says which
    entry each row uses; `image_bound` has an entry per row. With reference log-probs on every pair the batch
    carries `ref_chosen_logps`, `ref_rejected_logps` (sums) and `ref_chosen_avg_logps`, `ref_rejected_avg_logps`,
    all [B] float32."""
    rows = [(e["chosen_input_ids"], e["chosen_labels"]) for e in examples] + [
        (e["rejected_input_ids"], e["rejected_labels"]) for e in examples
    ]
    length = max(len(ids) for ids, _ in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, length), pad_token_id, dtype=torch.long)  # [2B, T]
    labels = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)  # [2B, T]
    position_ids = torch.zeros((n_rows, length), dtype=torch.long)  # [2B, T]
    attention_mask = torch.zeros((n_rows, length), dtype=torch.long)  # [2B, T]
    for r, (ids, row_labels) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = ids
        labels[r, :n] = row_labels
        position_ids[r, :n] = torch.arange(n)
        attention_mask[r, :n] = 1
    batch: dict[str, Any] = {
        "idx": [e["idx"] for e in examples],
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "image_bound": [e["image_bound"] for e in examples] * 2,
        "pixel_values": [e["pixel_values"] for e in examples],
        "tgt_sizes": [e["tgt_sizes"] for e in examples],
        "image_index": torch.arange(len(examples)).repeat(2),  # [2B]
    }
    references = [e.get("reference") for e in examples]
    if all(ref is not None for ref in references):
        for key in ("chosen_logp", "rejected_logp", "chosen_avg_logp", "rejected_avg_logp"):
            values = [getattr(ref, key) for ref in references]
            batch[f"ref_{key}s"] = torch.tensor(values, dtype=torch.float32)  # [B]
    elif any(ref is not None for ref in references):
        raise ValueError(
            f"reference log-probs are known for some pairs of the batch but not for {batch['idx']}"
        )
    return batch
