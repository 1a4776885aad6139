"""`mllm train sft` from the command line: in-process, under torchrun with two CPU processes, and its configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from helpers.data_files import make_sft_files

from mllm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sft_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "sft",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "4",
        "--per-device-train-batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "2",
        "--logging-steps",
        "1",
        "--save-strategy",
        "steps",
        "--save-steps",
        "2",
        "--use-cpu",
        "true",
        "--report-to",
        "none",
        *extra,
    ]


def test_train_sft_cli_writes_model_curves_and_resumes(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.model.modeling import MLLMModel
    from mllm.train.curves import read_log_history

    data = make_sft_files(tmp_path / "d", 8)
    out = tmp_path / "run"
    assert main(_sft_argv(small_model_dir, data, out)) == 0
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    assert (out / "loss_curves.png").stat().st_size > 1000
    history = read_log_history(out)
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4]
    MLLMModel.from_pretrained(out)  # a plain model directory again
    # Without --resume-from-checkpoint or --overwrite-output-dir the finished run is not replaced.
    before = (out / "model.safetensors").read_bytes()
    assert main(_sft_argv(small_model_dir, data, out)) == 2
    assert (out / "model.safetensors").read_bytes() == before
    # `auto` resumes from the newest checkpoint: asking for the same 4 steps again trains nothing new.
    assert main(_sft_argv(small_model_dir, data, out, "--resume-from-checkpoint", "auto")) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert main(["plot-curves", str(out), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def test_train_sft_reports_bad_flags_clearly(tmp_path: Path, small_model_dir: Path, capsys) -> None:
    code = main(
        [
            "train",
            "sft",
            "--model",
            str(small_model_dir),
            "--data",
            str(tmp_path / "none.json"),
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "--data: file not found" in capsys.readouterr().err


def test_torchrun_two_cpu_processes(tmp_path: Path, small_model_dir: Path) -> None:
    from mllm.model.modeling import MLLMModel

    data = make_sft_files(tmp_path / "d", 8)
    out = tmp_path / "ddp"
    argv = _sft_argv(small_model_dir, data, out, "--ddp-backend", "gloo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    result = subprocess.run(
        [*torchrun, "-m", "mllm", *argv], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Each step saw both processes' batches: 2 per device x 2 processes.
    assert state["train_batch_size"] == 2
    model = MLLMModel.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_deepspeed_configs_leave_the_schedule_to_the_command_line() -> None:
    for name in ("ds_zero2.json", "ds_zero3.json"):
        config = json.loads((ROOT / "configs" / name).read_text())
        assert "scheduler" not in config and "optimizer" not in config, name
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        assert config["gradient_accumulation_steps"] == "auto"
    assert json.loads((ROOT / "configs" / "ds_zero3.json").read_text())["zero_optimization"]["stage"] == 3


def test_resume_auto_passes_over_a_checkpoint_cut_short(tmp_path: Path) -> None:
    """A kill during a save leaves a checkpoint folder without trainer_state.json (Trainer writes it last)."""
    from helpers.training import cpu_training_args

    from mllm.train.runner import resolve_resume

    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-99-notes").mkdir()  # not a checkpoint name
    args = cpu_training_args(tmp_path, resume_from_checkpoint="auto")
    assert resolve_resume(args) == str(tmp_path / "checkpoint-8")
    assert resolve_resume(cpu_training_args(tmp_path / "none", resume_from_checkpoint="auto")) is None
    assert resolve_resume(cpu_training_args(tmp_path, resume_from_checkpoint="x")) == "x"
