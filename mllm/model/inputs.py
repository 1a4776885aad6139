"""`MLLMInputs`: the one batch type. The processor returns it; `MLLMModel.forward` and `MLLMModel.generate` take it.

A transformers `BatchFeature` (a dict with attribute access and `.to(device[, dtype])`, which also moves the
per-sample lists of image strips), so the reference's spellings keep working: `model(inputs)`, `model(**inputs)`,
`model.generate(inputs, tokenizer=...)` and `model.generate(**inputs, tokenizer=...)` are the same calls.

Fields (B = prompts, T = tokens, n_b = image slices of sample b):
- `input_ids` [B, T] long, left-padded for generation (right-padded by the training collators);
- `attention_mask` [B, T] long, 1 on real tokens (from the real lengths, not `input_ids != 0`);
- `position_ids` [B, T] long (optional: derived from the mask by `positions_from_mask` when absent);
- `image_bound` per sample an [n_b, 2] long tensor of the [start, end) ranges of placeholder tokens that the
  resampler's rows overwrite (already shifted by the left padding);
- `pixel_values` per sample a list of n_b [3, patch, L] float strips (patches side by side);
- `tgt_sizes` per sample an [n_b, 2] int32 tensor of each slice's (h, w) in patches;
- `image_sizes` per sample the images' (W, H) (informational, as in the reference's batch);
- optional `labels` [B, T] (training), `image_index` [B] (rows sharing one image: a preference pair) and
  `vision_hidden_states` (per sample the resampler rows, when they were computed before).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature

BATCH_FIELDS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "image_bound",
    "pixel_values",
    "tgt_sizes",
    "image_sizes",
    "image_index",
    "vision_hidden_states",
)
"""The keys of a batch that describe the inputs (everything else, e.g. `labels`, is for the loss)."""


class MLLMInputs(BatchFeature):
    """The processor's batch for `MLLMModel` (fields in the module docstring); `.to(device)` moves every tensor,
    nested lists of image strips included, and `.to(device, dtype)` also casts the float ones (the pixels)."""

    @classmethod
    def of(cls, data: Mapping[str, Any] | None = None, **fields: Any) -> MLLMInputs:
        """A batch from a mapping of fields (a processor batch, a collator's dict) and/or keyword fields; an
        `MLLMInputs` comes back unchanged when no field is added."""
        if isinstance(data, MLLMInputs) and not fields:
            return data
        merged = dict(data or {})
        merged.update({k: v for k, v in fields.items() if v is not None})
        if "input_ids" not in merged:
            raise ValueError("the batch has no input_ids")
        return cls(merged)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] for left-padded rows: 0.. over real tokens and 1 on padding, what transformers' generate
    computes (and what the reference fixture used). The one rule of the processor, the model and the fast decoder."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)
