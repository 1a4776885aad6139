"""Merging a LoRA checkpoint into its base model, giving a plain model directory."""

from __future__ import annotations

import logging
from pathlib import Path

from mllm.api import merge_adapter
from mllm.model.modeling import MLLMModel
from mllm.processing.processor import MLLMProcessor

logger = logging.getLogger(__name__)


def merge_lora(
    base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Load base + adapter (and the fully trained modules saved with it), merge (`mllm.api.merge_adapter`, the merge
    `mllm.load` does for a LoRA directory), save model and processor."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: output directory is not empty (pass --overwrite to replace it)")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir}: no adapter_config.json, so this is not a LoRA checkpoint")
    merged = merge_adapter(MLLMModel.from_pretrained(base_dir), adapter_dir)
    merged.save_pretrained(out_dir)
    processor_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir
    MLLMProcessor.from_pretrained(processor_dir).save_pretrained(out_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base_dir, out_dir)
    return out_dir
