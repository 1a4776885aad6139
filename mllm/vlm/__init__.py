"""One interface over the model families: our MiniCPM-V and transformers' LLaVA-1.5, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, BLIP-2 and InstructBLIP. `as_vlm(model, processor)` wraps a loaded pair in the family's implementation;
`mllm.load_vlm(path)` (the front door, `mllm.api`) loads and wraps in one step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm.model.modeling import MLLMModel
from mllm.vlm.hf import HF_FAMILIES, HFVLM
from mllm.vlm.interface import VLM, VLMBatch
from mllm.vlm.minicpmv import MiniCPMVVLM

MINICPMV_TYPES = ("mllm", "minicpmv")
HF_TYPES = HF_FAMILIES

__all__ = ["HF_TYPES", "MINICPMV_TYPES", "VLM", "VLMBatch", "as_vlm", "model_family"]


def model_family(model_dir: str | Path) -> str:
    """config.json's model_type of a model directory; a missing or unreadable config is a ValueError."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir}: not a model directory (no config.json)")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a JSON object ({exc})") from exc
    if model_type not in MINICPMV_TYPES + HF_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(MINICPMV_TYPES + HF_TYPES)}"
        )
    return model_type


def as_vlm(model: Any, processor: Any) -> VLM:
    """A loaded (model, processor) pair behind the family interface: ours as `MiniCPMVVLM`, transformers' families
    as `HFVLM` (by the model config's model_type)."""
    if isinstance(model, MLLMModel):
        return MiniCPMVVLM(model, processor)
    return HFVLM(model, processor, model.config.model_type)
