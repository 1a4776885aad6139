"""`VLM` over our MiniCPM-V model (`MLLMModel` + `MLLMProcessor`): the same prompt, label and generation code that
`mllm chat`, `mllm answer` and the SFT dataset use, behind the shared interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mllm.model.losses import IGNORE_INDEX
from mllm.model.modeling import MLLMModel
from mllm.processing.processor import MLLMProcessor, build_chat_messages
from mllm.vlm.interface import VLM, Conversation, VLMBatch


class MiniCPMVVLM(VLM):
    """An `MLLMModel` and its `MLLMProcessor` (whose settings decide the slicing)."""

    box_format = "mllm"

    def __init__(self, model: MLLMModel, processor: MLLMProcessor) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = model.config.model_type

    def prepare(self, conversations: list[Conversation], with_labels: bool = False) -> VLMBatch:
        if not with_labels:
            return VLMBatch(self.processor.chat_batch(conversations).to(self.device))
        rows = [self._example(c, f"conversation {b}") for b, c in enumerate(conversations)]
        inputs = self.processor.collate(rows, padding_side="right")
        labels = torch.full(inputs["input_ids"].shape, IGNORE_INDEX, dtype=torch.long)  # [B, T]
        for b, row in enumerate(rows):
            labels[b, : len(row["labels"])] = row["labels"]
        return VLMBatch(inputs.to(self.device), labels.to(self.device))

    def _example(self, conversation: Conversation, where: str) -> dict[str, Any]:
        """One conversation -> a training row (ids, labels on the assistant turns, image slices)."""
        messages, images = build_chat_messages(conversation)
        input_ids, targets, bound = self.processor.encode_training(
            messages, [image.size for image in images], where
        )
        pixels = self.processor.image_processor([images])
        return {
            "input_ids": input_ids,
            "labels": input_ids.masked_fill(~targets, IGNORE_INDEX),
            "image_bound": bound,
            "pixel_values": pixels["pixel_values"][0],
            "tgt_sizes": pixels["tgt_sizes"][0],
            "image_sizes": pixels["image_sizes"][0],
        }

    def logits(self, batch: VLMBatch) -> torch.Tensor:
        return self.model(batch.inputs, use_cache=False).logits  # [B, T, V]

    def generate_tokens(self, batch: VLMBatch, **generation_kwargs: Any) -> torch.Tensor:
        return self.model.generate(batch.inputs, tokenizer=self.tokenizer, **generation_kwargs)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return self.model._decode_text(tokens, self.tokenizer)

    def stop_ids(self) -> set[int]:
        return {*self.model.terminator_ids(self.tokenizer), self.processor.pad_token_id}

    def parameter_groups(self) -> dict[str, tuple[str, ...]]:
        return {"vision": ("vpm.",), "projector": ("resampler.",), "llm": ("llm.",)}

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
