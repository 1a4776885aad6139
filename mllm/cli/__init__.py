"""The `mllm` command line. Each subcommand lives in its own module of this package, which defines
`register(subparsers)`: it adds its parser and sets `func` (called with the parsed arguments). The evaluations are
one group, `mllm eval chair|vqa|grounding|decoding` (`mllm.cli.eval`).

Every command module is imported to build the parser, so they import only argparse and light modules at their top;
the library (torch, transformers) is imported inside each command's `run`, which keeps `mllm --help` fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module

# Subcommand modules, in the order `mllm --help` lists them. A module may register several commands.
COMMAND_MODULES = [
    "mllm.cli.chat",
    "mllm.cli.eval",
    "mllm.cli.train",
    "mllm.cli.logp",
    "mllm.cli.grounding",
    "mllm.cli.toy",
    "mllm.cli.demo",
    "mllm.cli.web",
    "mllm.cli.serve",
    "mllm.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm", description="Multimodal LLM toolkit (MiniCPM-V 2.6 family)."
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(name).register(subparsers)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """(parser, parsed arguments) of a command line, with the shared fix-ups: a question left after the options
    (`chat`), an older `--model` folded into MODEL; usage errors exit as argparse's do."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds an optional positional before the options that follow it (`chat DIR --image X "question"`
    # leaves "question" over); a command that names `extra_positional` takes such leftovers.
    target = getattr(args, "extra_positional", None)
    if extra and target and getattr(args, target) is None and not any(e.startswith("-") for e in extra):
        setattr(args, target, " ".join(extra))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    legacy_model = getattr(args, "legacy_model", None)  # an older spelling, e.g. `mllm logp --model DIR`
    if legacy_model is not None:
        if args.model is not None and args.model != legacy_model:
            parser.error(f"{args.command}: give the model once (MODEL, or the older --model)")
        args.model = legacy_model
    if getattr(args, "model_required", False) and args.model is None:
        parser.error(f"{args.command}: the model directory MODEL is required")
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (
        ValueError,
        FileNotFoundError,
    ) as exc:  # bad input: a clear message naming the file/record/field, not a traceback
        logging.getLogger("mllm").debug("bad input", exc_info=True)
        print(f"mllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


def run_command() -> int:
    """`main()` as a process's entry point (`python -m mllm`, `torchrun -m mllm`, the `mllm` script). A torchrun
    worker leaves through `leave_torchrun_worker` once the command returned (its streams flushed, then `os._exit`:
    ZeRO-3 workers could abort in the interpreter's shutdown); elsewhere the code is returned for the caller to exit
    with, and `mllm --help` never imports torch."""
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torch is loaded already: the command ran under torchrun
        from mllm.train.launch import leave_torchrun_worker

        leave_torchrun_worker(code)
    return code
