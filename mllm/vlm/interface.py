"""The one model interface the pipelines use, whatever the model family.

A conversation is our chat format: a list of `{"role": "user" | "assistant" | "system", "content": str | list of
str and PIL images}`. Every family implements:

- `prepare(conversations, with_labels=False)`: a batch. Without labels, each conversation is a prompt followed by
  the family's generation prompt, left-padded (for `generate_tokens`); with labels, whole conversations,
  right-padded, with `labels` on the assistant tokens only (what the family's model writes, up to and including
  its end-of-turn token) and IGNORE_INDEX elsewhere (for `logits`, SFT and log-probs).
- `logits(batch)`: the forward pass [B, T, V].
- `generate_tokens(batch, **generation_kwargs)`: the new tokens [B, new] of transformers' `generate`, stopping at
  the family's terminators; `decode` turns them into answers.
- `parameter_groups()`: parameter-name prefixes of the vision tower, the projector and the LLM (the freeze flags).
- `family` (config.json's model_type) and `box_format` (how the family writes boxes, see `mllm.boxes`).

On top of those, shared here: `answer` (conversations -> answers, greedy unless given other settings), `sft_loss`,
`response_logps` (per-sample log-probability of each conversation's assistant tokens), `freeze`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mllm.model.chat import decoding_kwargs
from mllm.model.losses import get_batch_logps, sft_loss

Conversation = list[dict[str, Any]]
MODULE_GROUPS = ("vision", "projector", "llm")


@dataclass
class VLMBatch:
    """Model inputs of one batch and, for training and scoring, the labels."""

    inputs: dict[str, Any]
    """What the family's forward / generate take (input_ids [B, T], attention_mask [B, T], pixels, ...)."""
    labels: torch.Tensor | None = None
    """[B, T] long: the token ids on assistant tokens, IGNORE_INDEX elsewhere; None for a generation batch."""


class VLM(ABC):
    """A model with its processor, seen through the operations the pipelines need."""

    family: str
    """config.json's model_type ("minicpmv", "llava", "qwen2_vl", ...)."""
    box_format: str
    """The box syntax the family writes (a `mllm.boxes.OUTPUT_BOX_FORMATS` name)."""
    model: torch.nn.Module
    """The underlying transformers model (for optimisers, peft, save_pretrained)."""

    @abstractmethod
    def prepare(self, conversations: list[Conversation], with_labels: bool = False) -> VLMBatch:
        """Conversations -> a batch on the model's device (see the module docstring)."""

    @abstractmethod
    def logits(self, batch: VLMBatch) -> torch.Tensor:
        """[B, T, V] next-token logits of a `prepare` batch."""

    @abstractmethod
    def generate_tokens(self, batch: VLMBatch, **generation_kwargs: Any) -> torch.Tensor:
        """[B, new] tokens generated after each prompt (padding after a terminator)."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> list[str]:
        """New tokens -> answers: cut at the first terminator, special tokens such as box tags kept, stripped."""

    @abstractmethod
    def stop_ids(self) -> set[int]:
        """Token ids that end an answer or pad it after its end (terminators and the pad id)."""

    @abstractmethod
    def parameter_groups(self) -> dict[str, tuple[str, ...]]:
        """{"vision": prefixes, "projector": prefixes, "llm": prefixes} of the model's parameter names; a parameter
        belongs to the group of its longest matching prefix."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the model and its processor files so that `mllm.load_vlm(out_dir)` opens them again."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer(self, conversations: list[Conversation], **generation_kwargs: Any) -> list[str]:
        """Conversations -> answers from one `generate` call; `generation_kwargs` default to greedy decoding (use
        `mllm.model.chat.decoding_kwargs` for our presets)."""
        kwargs = generation_kwargs or decoding_kwargs("greedy")
        return self.decode(self.generate_tokens(self.prepare(conversations), **kwargs))

    def count_generated(self, tokens: torch.Tensor) -> int:
        """How many tokens of a `generate_tokens` result are answer tokens (not terminators or padding)."""
        stops = self.stop_ids()
        return sum(1 for row in tokens.tolist() for tok in row if tok not in stops)

    def sft_loss(self, batch: VLMBatch) -> torch.Tensor:
        """Next-token cross-entropy over the assistant tokens of a labelled batch (`mllm.model.losses.sft_loss`)."""
        if batch.labels is None:
            raise ValueError("sft_loss needs a batch prepared with with_labels=True")
        return sft_loss(self.logits(batch), batch.labels)

    def response_logps(self, batch: VLMBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token [B, T-1], sum [B], average [B]) log-probabilities of each sample's assistant tokens."""
        if batch.labels is None:
            raise ValueError("response_logps needs a batch prepared with with_labels=True")
        return get_batch_logps(self.logits(batch), batch.labels, return_all=True)

    def group_of(self, name: str) -> str:
        """The group ("vision", "projector" or "llm") of a parameter name; a name no prefix covers is a ValueError."""
        best, best_length = None, -1
        for group, prefixes in self.parameter_groups().items():
            for prefix in prefixes:
                if name.startswith(prefix) and len(prefix) > best_length:
                    best, best_length = group, len(prefix)
        if best is None:
            raise ValueError(f"parameter {name!r} of the {self.family} model is in none of {MODULE_GROUPS}")
        return best

    def freeze(self, vision: bool = False, projector: bool = False, llm: bool = False) -> None:
        """Switch requires_grad off for the chosen groups and on for the others."""
        frozen = {"vision": vision, "projector": projector, "llm": llm}
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(not frozen[self.group_of(name)])
