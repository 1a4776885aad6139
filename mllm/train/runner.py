"""Command-line entry for SFT (and grounding, which is SFT on prepared grounding data): parse, train, save, plot."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

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

    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate of the vision tower when it is trained (--tune-vision); default: "
            "--learning-rate. A tower pretrained on its own task can adapt to the LLM at a lower rate without "
            "forgetting that task."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vision_learning_rate is not None and self.vision_learning_rate < 0:
            raise ValueError(f"--vision-learning-rate must be >= 0, got {self.vision_learning_rate}")
        if self.loss_reduction not in SFT_LOSS_REDUCTIONS:
            raise ValueError(
                f"--loss-reduction must be one of {SFT_LOSS_REDUCTIONS}, got {self.loss_reduction!r}"
            )


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
