"""`mllm train sft --torch-compile`: Trainer's whole-model `torch.compile` trains our model (LoRA, images, our loss
and collator) to the eager run's losses. On CPU the backend is aot_eager (dynamo's graph capture and AOTAutograd's
forward/backward graphs, without inductor's C++ code generation); on CUDA the default inductor runs the same graphs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data_files import make_sft_files

from mllm.cli import main


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def test_torch_compile_trains_to_the_eager_losses(tmp_path: Path, small_model_dir: Path) -> None:
    data = make_sft_files(tmp_path / "d", 4)
    base = [
        "train",
        "sft",
        "--model",
        str(small_model_dir),
        "--data",
        str(data),
        "--use-lora",
        "true",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "1",
        "--save-strategy",
        "no",
        "--use-cpu",
        "true",
        "--report-to",
        "none",
        "--seed",
        "0",
    ]
    assert main([*base, "--output-dir", str(tmp_path / "eager")]) == 0
    compiled = [*base, "--output-dir", str(tmp_path / "compiled"), "--torch-compile", "true"]
    torch._dynamo.utils.counters.clear()
    assert main([*compiled, "--torch-compile-backend", "aot_eager"]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the flag did compile
    eager, traced = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 2 and eager[0] != eager[-1]  # the adapters learned: the second loss differs
    assert traced == pytest.approx(eager, rel=1e-4)
