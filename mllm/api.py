"""The front door: `mllm.load(path) -> (model, processor)` and `mllm.load_vlm(path) -> VLM`, for every model the
project reads.

    model, processor = mllm.load("MLLM_Excercise_Model")                    # MiniCPM-V 2.6 layout: MLLMModel
    model, processor = mllm.load("out/sft_lora")                            # a LoRA checkpoint: base + adapter merged
    model, processor = mllm.load("llava-1.5-7b-hf")                         # transformers' families (see mllm.vlm)
    vlm = mllm.load_vlm("Qwen2-VL-2B-Instruct")                              # the same, behind one interface

The command line, the web page, the server and the demo load through here. Which implementation is used follows
config.json's model_type (`mllm.vlm.model_family`); a LoRA directory (adapter_config.json) names its base model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mllm.model.modeling import MLLMModel
from mllm.processing.processor import MLLMProcessor
from mllm.vlm import MINICPMV_TYPES, VLM, as_vlm, model_family
from mllm.vlm.hf import load_hf_family

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Names `dtype` may take besides a torch dtype (auto: bfloat16 on a GPU, float32 on a CPU)."""


def resolve_device(device: str | torch.device | None) -> str:
    """`device`, or cuda when torch sees a GPU and cpu otherwise."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """A torch dtype from a name of DTYPES (or a dtype); None and "auto" are bfloat16 on CUDA, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def lora_base(path: Path) -> Path | None:
    """The base model directory a LoRA checkpoint (adapter_config.json) was trained on; None for a plain model
    directory. A base that is not a model directory here is a ValueError naming both."""
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(
            f"{path} is a LoRA checkpoint whose base model ({base!r}) is not a model directory here: "
            f"merge it first with `mllm merge-lora BASE {path} OUT`"
        )
    return Path(base)


def merge_adapter(model: MLLMModel, adapter_dir: str | Path) -> MLLMModel:
    """`model` with the LoRA adapter of `adapter_dir` (and the modules trained fully beside it) merged in."""
    from peft import PeftModel  # peft's import is slow; only LoRA directories need it

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    **processor_overrides: Any,
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, its processor) from a model directory.

    Our MiniCPM-V layout (model_type "mllm" or "minicpmv") gives an `MLLMModel` and an `MLLMProcessor`, whose
    slicing settings `processor_overrides` change (e.g. `max_slice_nums=1`; None values are ignored); a LoRA
    checkpoint gives its base with the adapter merged, the processor files read from the checkpoint. A directory
    of transformers' image-text-to-text families (`mllm.vlm.HF_TYPES`) gives transformers' model and processor,
    which take no overrides. `attn_implementation` defaults to "sdpa" for ours."""
    path = Path(path)
    overrides = {k: v for k, v in processor_overrides.items() if v is not None}
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    base = lora_base(path)
    family = model_family(base or path)
    if family not in MINICPMV_TYPES:
        if base is not None:
            raise ValueError(f"{path}: LoRA checkpoints are read for MiniCPM-V models only, not {family}")
        if overrides:
            raise ValueError(
                f"{path}: {', '.join(f'--{k.replace(chr(95), chr(45))}' for k in overrides)} is a MiniCPM-V "
                f"setting; the {family} processor decides its tiling itself"
            )
        return load_hf_family(path, device, torch_dtype)
    processor = MLLMProcessor.from_pretrained(
        path, **overrides
    )  # checks the tokenizer before the weights load
    model = MLLMModel.from_pretrained(
        base or path,
        torch_dtype=torch_dtype,
        device=device,
        attn_implementation=attn_implementation or "sdpa",
    )
    if base is not None:
        model = merge_adapter(model, path)
        logger.info("merged the LoRA adapter of %s into %s", path, base)
    return model.eval(), processor


def load_vlm(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **processor_overrides: Any,
) -> VLM:
    """`load`, seen through the one interface over the model families (`mllm.vlm.VLM`)."""
    return as_vlm(*load(path, device, dtype, **processor_overrides))
