"""One interface over the model families: our MiniCPM-V and transformers' LLaVA-1.5, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL, BLIP-2 and InstructBLIP. `load_vlm(path)` picks the implementation from config.json's model_type."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mllm.vlm.interface import VLM, VLMBatch

MINICPMV_TYPES = ("mllm", "minicpmv")
HF_TYPES = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip-2", "instructblip")

__all__ = ["HF_TYPES", "MINICPMV_TYPES", "VLM", "VLMBatch", "load_vlm", "model_family"]


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


def load_vlm(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None) -> VLM:
    """The model directory's family implementation, in eval mode on `device` (default: cuda if available)."""
    family = model_family(model_dir)
    if family in MINICPMV_TYPES:
        from mllm.vlm.minicpmv import MiniCPMVVLM

        return MiniCPMVVLM.from_pretrained(model_dir, device, dtype)
    from mllm.vlm.hf import HFVLM

    return HFVLM.from_pretrained(model_dir, device, dtype)
