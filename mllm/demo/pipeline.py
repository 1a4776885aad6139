"""`run_demo`: the stages in order, each skipped when its done.json exists, then REPORT.md.

world -> model (tokenizer + random tiny model) -> vision (the tower learns the boxes) -> sft_data (REC converted
and mixed) -> align (a first SFT stage on one kind of item: the position questions) -> questions (every yes/no and
short-answer question) -> sft -> eval_sft -> logps
(reference log-probs) -> preference (NCA) -> eval_preference -> REPORT.md and metrics.json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mllm.demo.build import MODEL_STAGE, WORLD_STAGE, make_model, make_world
from mllm.demo.config import DemoConfig
from mllm.demo.evaluate import evaluate_model
from mllm.demo.metrics import write_metrics
from mllm.demo.preference import (
    LOGPS_STAGE,
    PREFERENCE_STAGE,
    compute_logps,
    preference_model_dir,
    train_preference,
)
from mllm.demo.report import build_report
from mllm.demo.sft import (
    ALIGN_STAGE,
    QUESTIONS_STAGE,
    SFT_DATA_STAGE,
    SFT_STAGE,
    make_sft_data,
    sft_model_dir,
    train_align,
    train_questions,
    train_sft,
)
from mllm.demo.stages import StageRecord, check_config, run_stage
from mllm.demo.vision import VISION_STAGE, train_vision_stage

logger = logging.getLogger(__name__)

EVAL_SFT_STAGE = "eval_sft"
EVAL_PREFERENCE_STAGE = "eval_preference"


def stage_functions(config: DemoConfig) -> list[tuple[str, Callable[[Path], dict]]]:
    """(name, fn(stage folder) -> figures) in execution order."""
    stages = [
        (WORLD_STAGE, partial(make_world, config)),
        (MODEL_STAGE, partial(make_model, config)),
    ]
    if config.vision_steps > 0:
        stages.append((VISION_STAGE, partial(train_vision_stage, config)))
    stages.append((SFT_DATA_STAGE, partial(make_sft_data, config)))
    if config.align_steps > 0:
        stages.append((ALIGN_STAGE, partial(train_align, config)))
    if config.questions_steps > 0:
        stages.append((QUESTIONS_STAGE, partial(train_questions, config)))
    if config.sft_steps > 0:
        stages.append((SFT_STAGE, partial(train_sft, config)))
    stages += [
        (EVAL_SFT_STAGE, lambda folder: evaluate_model(config, folder, sft_model_dir(config))),
    ]
    if config.preference_steps > 0:
        stages += [
            (LOGPS_STAGE, partial(compute_logps, config)),
            (PREFERENCE_STAGE, partial(train_preference, config)),
            (
                EVAL_PREFERENCE_STAGE,
                lambda folder: evaluate_model(config, folder, preference_model_dir(config)),
            ),
        ]
    return stages


STAGES = (
    WORLD_STAGE,
    MODEL_STAGE,
    VISION_STAGE,
    SFT_DATA_STAGE,
    ALIGN_STAGE,
    QUESTIONS_STAGE,
    SFT_STAGE,
    EVAL_SFT_STAGE,
    LOGPS_STAGE,
    PREFERENCE_STAGE,
    EVAL_PREFERENCE_STAGE,
)
"""Every stage name, in order (the `until` argument of `run_demo` takes one)."""


def run_demo(
    config: DemoConfig, until: str | None = None, echo: Callable[[str], None] = print
) -> dict[str, StageRecord]:
    """Run (or skip, when done) every stage up to and including `until`, then write REPORT.md and metrics.json.

    Uses `config.threads` torch threads for the duration (restored afterwards): on a shared 2-core machine more
    threads only fight over the cores. OMP_WAIT_POLICY=PASSIVE is set for child processes; for this process it
    only takes effect when set before torch starts its thread pool (the CLI sets it first thing).
    """
    import torch

    if until is not None and until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    config.validate()
    config.out.mkdir(parents=True, exist_ok=True)
    check_config(config)
    precision = config.training_precision()
    if config.bf16 is None and precision == "float32":
        precision += " (no bfloat16 path on this device)"
    echo(f"demo: {config.torch_device()}, {config.training_processes()} training process(es), {precision}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    records: dict[str, StageRecord] = {}
    try:
        for name, fn in stage_functions(config):
            records[name] = run_stage(config, name, fn, echo)
            if name == until:
                break
    finally:
        torch.set_num_threads(threads)
    report = build_report(config, records)
    metrics = write_metrics(config, {name: record.figures for name, record in records.items()})
    total = sum(r.seconds for r in records.values())
    echo(
        f"demo done: {len(records)} stages ({total:.0f} s of stage time); report: {report}, figures: {metrics}"
    )
    return records
