"""The tiny fixture's stored inputs as the `data` dict `MLLMModel` takes (no processor needed).

Imported by the model tests; pytest puts this folder on the import path (the default "prepend" import mode).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

# The processor batch of the fixture: sample 0 is img_1000x300 (4 slices), sample 1 img_448x448 (1 slice).
BATCH_IMAGES = ("img_1000x300", "img_448x448")
SAMPLE1_LEFT_PAD = 198  # sample 1 has 93 real tokens in a row of 291


def expected(model_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "expected" / f"{name}.safetensors"))


def slices(model_dir: Path, image: str, count: int) -> list[torch.Tensor]:
    """The stored uint8 pixel codes of `image`'s s9 slices as the reference float32 values."""
    stored = expected(model_dir, "image_processing")
    codes = [stored[f"imgproc.{image}.s9.slice{j}.pixel_u8"] for j in range(count)]
    return [(c.to(torch.float32) / 255 - 0.5) / 0.5 for c in codes]


def batch_data(model_dir: Path) -> dict:
    """The two-sample left-padded batch of expected/processor_batch with its pixel values."""
    b = expected(model_dir, "processor_batch")
    return {
        "input_ids": b["batch.input_ids"],
        "attention_mask": b["batch.attention_mask"],
        "position_ids": b["batch.position_ids"],
        "image_bound": [b["batch.image_bound.0"], b["batch.image_bound.1"]],
        "tgt_sizes": [b["batch.tgt_sizes.0"], b["batch.tgt_sizes.1"]],
        "pixel_values": [slices(model_dir, BATCH_IMAGES[0], 4), slices(model_dir, BATCH_IMAGES[1], 1)],
    }


def single_sample(data: dict, index: int) -> dict:
    """Sample `index` of the batch alone, without its left padding (what the reference generate got)."""
    pad = int((data["attention_mask"][index] == 0).sum())
    return {
        "input_ids": data["input_ids"][index : index + 1, pad:],
        "attention_mask": data["attention_mask"][index : index + 1, pad:],
        "image_bound": [data["image_bound"][index] - pad],
        "tgt_sizes": [data["tgt_sizes"][index]],
        "pixel_values": [data["pixel_values"][index]],
    }


def generate_on(model, data: dict, tokenizer, **kwargs):
    """`MLLMModel.generate` on a fixture data dict (as built by batch_data / single_sample)."""
    return model.generate(
        data["input_ids"],
        data["pixel_values"],
        data["tgt_sizes"],
        data["image_bound"],
        data["attention_mask"],
        tokenizer,
        **kwargs,
    )
