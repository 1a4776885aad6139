"""`mllm toy make OUT_DIR` (the synthetic toy world) and `mllm toy tokenizer OUT_DIR --world DIR` (its tokenizer and,
with --preset, the tiny model-directory skeleton)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy", help="Make the synthetic toy world, its tokenizer and the tiny preset."
    )
    toy_sub = parser.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    parser.set_defaults(func=lambda args: _missing_subcommand(parser))

    make = toy_sub.add_parser(
        "make", help="Generate the toy world (images + SFT, CHAIR, REC, preference files)."
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="Output folder (must be empty unless --overwrite).")
    make.add_argument(
        "--seed", type=int, default=0, help="Master seed; the same seed gives byte-identical files."
    )
    make.add_argument("--n-train", type=int, default=2000, help="Training images (default: 2000).")
    make.add_argument("--n-test", type=int, default=300, help="Held-out images (default: 300).")
    make.add_argument(
        "--noise-rate",
        type=float,
        default=0.15,
        help="Share of train descriptions with an absent object (0.15).",
    )
    make.add_argument(
        "--train-yes-no-pairs",
        type=int,
        default=2,
        help="Yes/no pairs per training image, of different categories (1-4; default: 2).",
    )
    make.add_argument(
        "--no-open-questions",
        action="store_true",
        help="Leave out the short-answer training questions (colours present, count, colour of a shape).",
    )
    make.add_argument("--n-preference", type=int, default=1000, help="Preference pairs (default: 1000).")
    make.add_argument(
        "--preference-image",
        choices=("path", "base64"),
        default="path",
        help="Preference items carry `image_path` (default) or a base64 `image`.",
    )
    make.add_argument("--overwrite", action="store_true", help="Replace a toy world already in OUT_DIR.")
    make.set_defaults(func=run_make)

    tok = toy_sub.add_parser(
        "tokenizer", help="Train the toy tokenizer on a toy world (optionally the preset too)."
    )
    tok.add_argument("out_dir", metavar="OUT_DIR", help="Folder for tokenizer.json and its config files.")
    tok.add_argument("--world", required=True, help="A toy world folder made by `mllm toy make`.")
    tok.add_argument("--vocab-size", type=int, default=600, help="Upper bound on the vocabulary size (600).")
    tok.add_argument(
        "--preset",
        action="store_true",
        help="Also write config.json and preprocessor_config.json (tiny preset).",
    )
    tok.set_defaults(func=run_tokenizer)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_make(args: argparse.Namespace) -> int:
    from mllm.toy.world import make_toy_world

    try:
        counts = make_toy_world(
            args.out_dir,
            overwrite=args.overwrite,
            seed=args.seed,
            n_train=args.n_train,
            n_test=args.n_test,
            noise_rate=args.noise_rate,
            train_yes_no_pairs=args.train_yes_no_pairs,
            open_questions=not args.no_open_questions,
            n_preference=args.n_preference,
            preference_image=args.preference_image,
        )
    except ValueError as error:
        print(f"mllm toy make: error: {error}", file=sys.stderr)
        return 2
    print(f"toy world written to {args.out_dir}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from mllm.toy.tokenizer import build_toy_tokenizer, toy_corpus, write_toy_preset

    try:
        out = build_toy_tokenizer(toy_corpus(args.world), args.out_dir, vocab_size=args.vocab_size)
        if args.preset:
            write_toy_preset(out, out)
    except ValueError as error:
        print(f"mllm toy tokenizer: error: {error}", file=sys.stderr)
        return 2
    print(f"toy tokenizer{' and preset' if args.preset else ''} written to {Path(out)}")
    return 0
