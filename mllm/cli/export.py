"""`mllm export MODEL OUT --format minicpmv --base OFFICIAL_DIR`: the official layout for vLLM, SGLang, SWIFT,
LLaMA-Factory and transformers' remote code (see `mllm.model.export`)."""

from __future__ import annotations

import argparse

from mllm.cli.common import add_model_argument

FORMATS = ("minicpmv",)  # = mllm.model.export.FORMATS (no torch import at CLI build time)


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a model directory in the official MiniCPM-V layout (for vLLM, SGLang, SWIFT, ...)",
    )
    add_model_argument(export)
    export.add_argument("out")
    export.add_argument(
        "--format", required=True, choices=FORMATS, help="minicpmv: the official MiniCPM-V layout"
    )
    export.add_argument(
        "--base",
        required=True,
        help="the official checkpoint directory (openbmb/MiniCPM-V-2_6) whose remote-code .py files are copied",
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from mllm.model.export import export_minicpmv

    print(export_minicpmv(args.model, args.out, args.base, overwrite=args.overwrite))
    return 0
