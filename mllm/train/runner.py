"""Command-line entry for SFT (and grounding, which is SFT on prepared grounding data): parse, train, save, plot."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mllm.train.curves import plot_curves_after_training
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
        metadata={"help": "A checkpoint directory, or 'auto' for the latest complete one in --output-dir."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train afresh into an --output-dir that holds a finished model or checkpoints (its checkpoints "
            "are deleted first, so that a later --resume-from-checkpoint auto cannot pick them). Without it, or "
            "--resume-from-checkpoint, such a directory is refused."
        },
    )
    loss_reduction: str = field(
        default="token",
        metadata={
            "help": "SFT loss: 'token' (mean over every target token of the batch, as LLaVA and MiniCPM-V) or "
            "'sample' (mean of each conversation's mean token loss: short answers weigh as much as long ones)."
        },
    )
    length_pieces: int = field(
        default=1,
        metadata={
            "help": "Run each batch of this framework's model as up to this many forwards, on groups of samples of "
            "similar length, each padded only to its own longest: the same loss and gradients up to rounding, fewer "
            "padded positions computed (a mixed batch of short answers and long descriptions is a third padding). "
            "1: one forward per batch."
        },
    )
    vision_cache_mb: int = field(
        default=0,
        metadata={
            "help": "Keep the frozen vision tower's outputs of up to this many MiB of image slices per process and "
            "reuse them when a slice comes again (the tower's rows up to rounding: mllm.model.vision_cache); "
            "0: off. Needs a frozen tower (no --tune-vision), this framework's model and no --deepspeed."
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
        if not self.use_cpu and not accelerator_available():
            # Without it accelerate finds no distributed backend on a CPU-only machine and counts one process per
            # launch: under torchrun the processes then train unsynchronised copies (plain DDP) or, under DeepSpeed,
            # the "auto" train_batch_size is filled for one process and DeepSpeed's batch assertion stops both.
            logger.info("no GPU or other accelerator: training on the CPU (--use-cpu true)")
            self.use_cpu = True
        super().__post_init__()
        if self.length_pieces < 1:
            raise ValueError(f"--length-pieces must be at least 1, got {self.length_pieces}")
        if self.vision_cache_mb < 0:
            raise ValueError(f"--vision-cache-mb must be >= 0 (0: off), got {self.vision_cache_mb}")
        if self.vision_learning_rate is not None and self.vision_learning_rate < 0:
            raise ValueError(f"--vision-learning-rate must be >= 0, got {self.vision_learning_rate}")
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


FINISHED_MODEL_FILES = ("config.json", "adapter_config.json", TRAINER_STATE_NAME)
"""Files whose presence in --output-dir means a model was already saved there."""


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-<step> folders of an output directory, oldest first."""
    if not folder.is_dir():
        return []
    steps = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := CHECKPOINT_NAME.fullmatch(path.name))
    )
    return [path for _, path in steps]


def check_output_dir(training_args: TrainingArguments) -> None:
    """Refuse an --output-dir that holds a finished model or checkpoints unless the flags say what to do with it:
    `--resume-from-checkpoint` (go on from a checkpoint) or `--overwrite-output-dir` (train afresh; the old
    checkpoints and trainer state are deleted first). Run by every process before anything is loaded."""
    folder = Path(training_args.output_dir)
    found = [name for name in FINISHED_MODEL_FILES if (folder / name).is_file()]
    found += [path.name for path in checkpoints(folder)]
    if not found or training_args.resume_from_checkpoint:
        return
    if not getattr(training_args, "overwrite_output_dir", False):
        raise ValueError(
            f"--output-dir {folder} already holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}: "
            "pass --resume-from-checkpoint auto to go on from its newest checkpoint, or --overwrite-output-dir "
            "true to train afresh (its checkpoints are then deleted), or choose another --output-dir"
        )
    logger.warning("--overwrite-output-dir: deleting %s from %s", ", ".join(found), folder)
    for path in checkpoints(folder):
        shutil.rmtree(path, ignore_errors=True)  # every process may try: the first one wins
    (folder / TRAINER_STATE_NAME).unlink(missing_ok=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it looks complete): Trainer writes
    trainer_state.json last, so a checkpoint cut short by a kill lacks it; a torn trainer_state.json, or an empty
    optimizer or weights file, comes from a full disk or a kill while the files were flushed."""
    state = path / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        parsed = json.loads(state.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{TRAINER_STATE_NAME} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(parsed, dict):
        return f"{TRAINER_STATE_NAME} is not a JSON object"
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    empty = [p.name for p in weights if p.stat().st_size == 0]
    if empty:
        return f"empty file(s): {', '.join(sorted(empty))}"
    return None


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """`--resume-from-checkpoint auto` -> the newest complete checkpoint in the output dir (None if there is none).

    A checkpoint with a problem (`checkpoint_problem`: cut short by a kill, a torn trainer_state.json, an empty
    optimizer.pt) is passed over, with a warning naming it, for the one before it."""
    value = training_args.resume_from_checkpoint
    if value != "auto":
        return value
    for path in reversed(checkpoints(Path(training_args.output_dir))):
        problem = checkpoint_problem(path)
        if problem is None:
            logger.info("resume auto: %s", path)
            return str(path)
        logger.warning("resume auto: %s is incomplete or unreadable (%s), skipped", path, problem)
    logger.info("resume auto: no checkpoint yet, starting fresh")
    return None


def parse_sft_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, MLLMTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, MLLMTrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def run_sft(argv: list[str], task: str = "sft") -> int:
    model_args, data_args, training_args = parse_sft_args(argv)
    check_output_dir(training_args)
    trainer = build_sft_trainer(model_args, data_args, training_args)
    resume = resolve_resume(training_args)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        png = plot_curves_after_training(training_args.output_dir)
        logger.info("%s done: model in %s, curves in %s", task, training_args.output_dir, png)
    return 0
