"""`mllm train sft|grounding|preference|vision MODEL [options]`, `mllm plot-curves RUN_DIR`, `mllm merge-lora BASE
CKPT OUT`.

Training options are parsed by transformers' HfArgumentParser from our small model/data dataclasses plus all of
`TrainingArguments` (`mllm train sft --help` lists them), so every Trainer flag works as usual. The spellings of the
other commands work here too (`training_argv`): the model directory may come first (for `--model`), `--out` is
`--output-dir` and `--image-root` is `--image-folder`.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

TASKS = ("sft", "grounding", "preference", "vision")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune a model: sft, grounding (SFT on grounding data), preference, or vision (the tower on COCO boxes)",
        description="Fine-tune a model directory. Run `mllm train sft --help` for every option.",
        add_help=True,
    )
    train.add_argument("task", choices=TASKS)
    train.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="MODEL (or --model MODEL), then data and TrainingArguments flags (--out for --output-dir, --image-root "
        "for --image-folder)",
    )
    train.set_defaults(func=run_train)

    plot = subparsers.add_parser(
        "plot-curves", help="PNG of train/eval loss (or other logged values) vs step"
    )
    plot.add_argument("run_dir")
    plot.add_argument("--keys", nargs="+", default=None, help="logged keys to plot (default: loss eval_loss)")
    plot.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/loss_curves.png)")
    plot.set_defaults(func=run_plot)

    merge = subparsers.add_parser("merge-lora", help="merge a LoRA checkpoint into its base model")
    merge.add_argument("base")
    merge.add_argument("checkpoint")
    merge.add_argument("out")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument(
        "--format", default=None, choices=("minicpmv",), help="write the official layout (as `mllm export`)"
    )
    merge.add_argument(
        "--remote-code-base",
        default=None,
        help="with --format: the official directory of the .py files (default: BASE)",
    )
    merge.set_defaults(func=run_merge)


SPELLINGS = {"--out": "--output-dir", "--image-root": "--image-folder"}
"""The command line's common flags -> the names of the training dataclasses' fields."""


def training_argv(options: list[str]) -> list[str]:
    """`mllm train` options in the spellings of the other commands -> HfArgumentParser's: a first positional
    MODEL becomes `--model MODEL`, `--out` `--output-dir`, `--image-root` `--image-folder` (also as `--flag=value`)."""
    argv = list(options)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    for i, item in enumerate(argv):
        flag, eq, value = item.partition("=")
        if flag in SPELLINGS:
            argv[i] = SPELLINGS[flag] + eq + value
    return argv


def run_train(args: argparse.Namespace) -> int:
    from mllm.train.launch import end_process_group

    try:
        return _train(args)
    finally:
        end_process_group()


def _train(args: argparse.Namespace) -> int:
    argv = training_argv(args.options)
    if args.task == "preference":
        from mllm.train.preference import main as preference_main

        return preference_main(argv)
    if args.task == "vision":
        from mllm.toy.pretrain import run_vision

        return run_vision(argv)
    from mllm.train.runner import run_sft

    return run_sft(argv, task=args.task)


def run_plot(args: argparse.Namespace) -> int:
    from mllm.train.curves import plot_curves

    print(plot_curves(args.run_dir, args.keys, args.out))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from mllm.model.export import check_target, export_minicpmv, remote_code_of
    from mllm.train.lora import merge_lora

    if args.format is None:
        print(merge_lora(args.base, args.checkpoint, args.out, overwrite=args.overwrite))
        return 0
    out, code_base = Path(args.out), Path(args.remote_code_base or args.base)
    check_target(out, args.overwrite)
    remote_code_of(code_base)  # refuse before the merge, not after
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merged.", dir=out.parent) as merged:
        merge_lora(args.base, args.checkpoint, merged, overwrite=True)
        print(export_minicpmv(merged, out, code_base, overwrite=args.overwrite))
    return 0
