"""Loading for the inference commands when the model directory may be of another family than MiniCPM-V
(LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, BLIP-2, InstructBLIP: see `mllm.vlm`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def is_other_family(model_dir: str | Path) -> bool:
    """True for a transformers model directory of a supported non-MiniCPM-V family (config.json's model_type);
    False for ours and for LoRA checkpoint directories (which `load_model_and_processor` handles)."""
    from mllm.vlm import HF_TYPES, model_family

    if (Path(model_dir) / "adapter_config.json").is_file():
        return False
    return model_family(model_dir) in HF_TYPES


def load_other_family(args: argparse.Namespace, device: str | None = None):
    """The `VLM` of `args.model_dir` with the --device/--dtype flags (the attention flag is the model's default)."""
    import torch

    from mllm.vlm import load_vlm

    if getattr(args, "fast_generate", False):
        raise ValueError("--fast-generate is the MiniCPM-V decoding path; leave it out for this model family")
    if getattr(args, "max_slice_nums", None) is not None:
        raise ValueError(
            "--max-slice-nums is a MiniCPM-V setting; this model family's processor decides its tiling"
        )
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return load_vlm(args.model_dir, device or args.device, dtype)


def answer_fn_for(args: argparse.Namespace, generation_kwargs: dict, device: str | None = None):
    """(a `generate_answers`-style answer function, the torch model it runs) for `args.model_dir`, whatever its
    family."""
    if is_other_family(args.model_dir):
        from mllm.eval.vlm_answer import vlm_answer_fn

        vlm = load_other_family(args, device)
        return vlm_answer_fn(vlm, generation_kwargs), vlm.model
    from mllm.cli.common import load_model_and_processor
    from mllm.eval.answer import model_answer_fn

    model, processor = load_model_and_processor(
        args.model_dir, device or args.device, args.dtype, args.attn_implementation
    )
    return model_answer_fn(model, processor, generation_kwargs, args.max_slice_nums), model
