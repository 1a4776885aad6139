"""Command-line entry for SFT (and grounding, which is SFT on prepared grounding data): parse, train, save, plot."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mllm.train.curves import plot_curves
from mllm.train.losses import SFT_LOSS_REDUCTIONS
from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer, default_training_arguments

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(PREFIX_CHECKPOINT_DIR + r"-(\d+)")
"""Trainer's checkpoint folders: checkpoint-<step>."""

_DEFAULTS = default_training_arguments()


@dataclass
class MLLMTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments with the defaults this framework needs; every flag stays available."""

    remove_unused_columns: bool = field(default=_DEFAULTS["remove_unused_columns"])
    label_names: list[str] | None = field(default_factory=lambda: list(_DEFAULTS["label_names"]))
    prediction_loss_only: bool = field(default=_DEFAULTS["prediction_loss_only"])
    report_to: str | None = field(default="tensorboard")
    logging_steps: float = field(default=_DEFAULTS["logging_steps"])
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint directory, or 'auto' for the latest one in --output-dir."},
    )
    loss_reduction: str = field(
        default="token",
        metadata={
            "help": "SFT loss: 'token' (mean over every target token of the batch, as LLaVA and MiniCPM-V) or "
            "'sample' (mean of each conversation's mean token loss: short answers weigh as much as long ones)."
        },
    )

    def __post_init__(self) -> None:
        if not self.use_cpu and not accelerator_available():
            # Without it accelerate finds no distributed backend on a CPU-only machine and counts one process per
            # launch: under torchrun the processes then train unsynchronised copies (plain DDP) or, under DeepSpeed,
            # the "auto" train_batch_size is filled for one process and DeepSpeed's batch assertion stops both.
            logger.info("no GPU or other accelerator: training on the CPU (--use-cpu true)")
            self.use_cpu = True
        super().__post_init__()
        if self.loss_reduction not in SFT_LOSS_REDUCTIONS:
            raise ValueError(
                f"--loss-reduction must be one of {SFT_LOSS_REDUCTIONS}, got {self.loss_reduction!r}"
            )
        if self.fsdp and self.distributed_state.distributed_type in CPU_OR_SINGLE:
            raise ValueError(
                f"--fsdp needs GPUs (or other accelerators) in processes started by torchrun: accelerate shards "
                f"only over those, and here ({self.distributed_state.distributed_type.value}) it would train "
                "without FSDP. On CPUs use --deepspeed configs/ds_zero3.json to shard instead."
            )


CPU_OR_SINGLE = (DistributedType.NO, DistributedType.MULTI_CPU)
"""Accelerate's process layouts in which it ignores an FSDP plugin."""


def accelerator_available() -> bool:
    """Whether torch sees a GPU or another accelerator (torch.accelerator, torch >= 2.6; else CUDA)."""
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume-from-checkpoint auto` -> the newest complete checkpoint in the output dir (None if there is none).

    Complete means its trainer_state.json exists: Trainer writes it after the weights, optimizer and RNG states, so a
    checkpoint cut short by a kill is passed over (with a warning) for the one before it."""
    value = training_args.resume_from_checkpoint
    if value != "auto":
        return value
    folder = Path(training_args.output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.fullmatch(path.name))
    )
    for _, path in reversed(steps):
        if (path / TRAINER_STATE_NAME).is_file():
            logger.info("resume auto: %s", path)
            return str(path)
        logger.warning("resume auto: %s is incomplete (no %s), skipped", path, TRAINER_STATE_NAME)
    logger.info("resume auto: no checkpoint yet, starting fresh")
    return None


def parse_sft_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, MLLMTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, MLLMTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def run_sft(argv: list[str], task: str = "sft") -> int:
    model_args, data_args, training_args = parse_sft_args(argv)
    trainer = build_sft_trainer(model_args, data_args, training_args)
    resume = resolve_resume(training_args)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        try:
            png = plot_curves(training_args.output_dir)
        except (
            ValueError
        ) as exc:  # e.g. fewer steps than --logging-steps: nothing to plot, the model is saved
            logger.warning("no loss curve: %s", exc)
            png = None
        logger.info("%s done: model in %s, curves in %s", task, training_args.output_dir, png)
    return 0
