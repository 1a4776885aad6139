"""`mllm demo`: the --fast demo learns (thresholds measured on CI-sized runs, see README), and an interrupted SFT
resumes from its checkpoint while finished stages are skipped.

Budget: about 4 minutes on 2 cores for this file (the --fast demo dominates; the resume test is a 40-image run).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from mllm.cli import main
from mllm.demo.config import demo_config
from mllm.demo.pipeline import run_demo
from mllm.demo.stages import DONE, DemoInterrupted

# Thresholds, from measured --fast runs (seed 0): see the README's demo section for the figures.
MIN_YES_NO_ACCURACY = 0.60
MIN_GROUNDING_GAIN = 0.05
"""Acc@0.5 must beat the constant (mean training) box by this much."""


def figures(out: Path, stage: str) -> dict:
    return json.loads((out / stage / DONE).read_text())["figures"]


def test_fast_demo_learns_and_preference_training_lowers_hallucination(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast"]) == 0

    before, after = figures(out, "eval_sft"), figures(out, "eval_preference")
    assert before["yes_no"]["n"] > 100
    assert before["yes_no"]["accuracy"] >= MIN_YES_NO_ACCURACY
    grounding = before["grounding"]
    assert 0.0 <= grounding["baseline_acc"] < 0.5  # computed from the training boxes, not assumed
    assert grounding["acc"] >= grounding["baseline_acc"] + MIN_GROUNDING_GAIN
    # Preference training (NCA against the SFT model's log-probs) lowers sampled object hallucination.
    assert after["chair"]["sampled"]["CHAIRi"] < before["chair"]["sampled"]["CHAIRi"]
    assert figures(out, "preference")["final_margin"] > 0

    report = (out / "REPORT.md").read_text()
    for heading in ("## Time per stage", "## Results (percent)", "## Curves", "## Grounding", "## Example answers"):
        assert heading in report
    for link in ("sft/loss.png", "preference/rewards.png", "report/grounding.png"):
        assert f"]({link})" in report and (out / link).is_file()
    # The trained model directories are ordinary model directories.
    for model_dir in (out / "sft" / "model", out / "preference" / "model"):
        assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
        assert (model_dir / "preprocessor_config.json").is_file()


def tiny_config(out: Path, **overrides):
    """A 40-image run that trains 6 SFT steps with a checkpoint every 2 (enough to test the bookkeeping)."""
    settings = dict(
        n_train=40,
        n_test=8,
        n_preference=8,
        sft_steps=6,
        sft_save_steps=2,
        sft_batch_size=2,
        eval_yes_no=4,
        eval_chair=4,
        chair_samples=1,
        eval_grounding=4,
        preference_steps=2,
    )
    settings.update(overrides)
    return demo_config(out, fast=True, **settings)


def test_interrupted_sft_resumes_from_its_checkpoint_and_done_stages_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    config = tiny_config(out, sft_interrupt_after=4)
    with pytest.raises(DemoInterrupted):
        run_demo(config, until="sft", echo=lambda line: None)
    run_dir = out / "sft" / "run"
    assert (run_dir / "checkpoint-4").is_dir()
    assert not (out / "sft" / DONE).exists()
    for stage in ("world", "model", "sft_data"):
        assert (out / stage / DONE).is_file()
    world_marker = (out / "world" / DONE).stat().st_mtime_ns
    checkpoint_state = json.loads((run_dir / "checkpoint-4" / "trainer_state.json").read_text())

    lines: list[str] = []
    records = run_demo(replace(config, sft_interrupt_after=None), until="sft", echo=lines.append)
    assert [name for name, r in records.items() if r.skipped] == ["world", "model", "sft_data"]
    assert any(line.startswith("[world] already done") for line in lines)
    assert (out / "world" / DONE).stat().st_mtime_ns == world_marker
    sft = records["sft"].figures
    assert sft["resumed_from"] == "checkpoint-4"
    assert sft["steps"] == 6
    # The history of steps 1-4 is the interrupted run's, carried over from the checkpoint, not a fresh start.
    state = json.loads((run_dir / "trainer_state.json").read_text())
    old = [row for row in checkpoint_state["log_history"] if "loss" in row]
    assert old and [row for row in state["log_history"] if "loss" in row][: len(old)] == old
    assert (out / "sft" / "model" / "model.safetensors").is_file()

    # A third run finds every stage done and computes nothing.
    again = run_demo(config, until="sft", echo=lambda line: None)
    assert all(record.skipped for record in again.values())


def test_other_settings_in_the_same_folder_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run_demo(tiny_config(out), until="world", echo=lambda line: None)
    with pytest.raises(ValueError, match="other settings .*n_train"):
        run_demo(tiny_config(out, n_train=41), until="world", echo=lambda line: None)
