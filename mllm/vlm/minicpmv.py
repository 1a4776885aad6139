"""`VLM` over our MiniCPM-V model (`MLLMModel` + `MLLMProcessor`): the same prompt, label and generation code that
`mllm chat`, `mllm answer` and the SFT dataset use, behind the shared interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mllm.data.sft import data_collator, encode_messages
from mllm.processing.processor import build_chat_messages
from mllm.vlm.interface import VLM, Conversation, VLMBatch


class MiniCPMVVLM(VLM):
    """An `MLLMModel` and its `MLLMProcessor`."""

    box_format = "mllm"

    def __init__(self, model, processor, max_slice_nums: int | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = model.config.model_type
        self.max_slice_nums = max_slice_nums

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None
    ) -> MiniCPMVVLM:
        from mllm.model.modeling import MLLMModel
        from mllm.processing.processor import MLLMProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model = MLLMModel.from_pretrained(model_dir, torch_dtype=dtype, device=device)
        model.eval()
        return cls(model, MLLMProcessor.from_pretrained(model_dir))

    def prepare(self, conversations: list[Conversation], with_labels: bool = False) -> VLMBatch:
        if not with_labels:
            inputs = self.processor.chat_batch(conversations, max_slice_nums=self.max_slice_nums)
        else:
            inputs = data_collator(
                [self._example(c, f"conversation {b}") for b, c in enumerate(conversations)],
                self.processor.pad_token_id,
            )
        labels = inputs.pop("labels", None)
        device = self.device
        for key in ("input_ids", "attention_mask", "position_ids"):
            inputs[key] = inputs[key].to(device)
        return VLMBatch(inputs, None if labels is None else labels.to(device))

    def _example(self, conversation: Conversation, where: str) -> dict[str, Any]:
        """One conversation -> a training sample (ids, labels on the assistant turns, image slices)."""
        messages, images = build_chat_messages(conversation)
        sizes = [image.size for image in images]
        input_ids, labels, bound = encode_messages(
            self.processor, messages, sizes, where, self.max_slice_nums
        )
        strips, tgt_sizes = [], [torch.zeros(0, 2, dtype=torch.int32)]
        for image in images:
            image_strips, tgt = self.processor.image_processor.preprocess_image(
                image, self.max_slice_nums, where=where
            )
            strips.extend(image_strips)
            tgt_sizes.append(tgt)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(len(input_ids), dtype=torch.long),
            "image_bound": bound,
            "pixel_values": strips,
            "tgt_sizes": torch.cat(tgt_sizes),
        }

    def logits(self, batch: VLMBatch) -> torch.Tensor:
        return self.model(batch.inputs, use_cache=False).logits  # [B, T, V]

    def generate_tokens(self, batch: VLMBatch, **generation_kwargs: Any) -> torch.Tensor:
        inputs = batch.inputs
        return self.model.generate(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            tgt_sizes=inputs["tgt_sizes"],
            image_bound=inputs["image_bound"],
            attention_mask=inputs["attention_mask"],
            tokenizer=self.tokenizer,
            **generation_kwargs,
        )

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return self.model._decode_text(tokens, self.tokenizer)

    def stop_ids(self) -> set[int]:
        return {*self.model.terminator_ids(self.tokenizer), self.processor.pad_token_id}

    def parameter_groups(self) -> dict[str, tuple[str, ...]]:
        return {"vision": ("vpm.",), "projector": ("resampler.",), "llm": ("llm.",)}

    def save_pretrained(self, out_dir: str | Path) -> None:
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
