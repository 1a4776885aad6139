"""`mllm eval decoding MODEL --questions Q.jsonl (--coco-path DIR | --cache FILE)` (older spelling: `mllm
compare-decoding`, `--out-dir`): greedy vs sampling vs beam search, scored by CHAIR (hallucination) and length, as a
markdown table, JSON and a bar chart."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mllm.cli.common import add_hidden_alias, add_model_argument, add_model_flags, load_from_args

logger = logging.getLogger(__name__)


HELP = "answer a question file with several decoding strategies and compare their CHAIR scores"
DESCRIPTION = (
    "Generate answers with each strategy (resumable), score them with CHAIR (ground truth loaded once) and write "
    "decoding_comparison.md/.json/.png in --out."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--questions", required=True, help="objhal_bench-format jsonl")
    parser.add_argument("--coco-path", help="folder with the COCO 2014 annotations (CHAIR ground truth)")
    parser.add_argument("--cache", help="CHAIR ground-truth cache (chair_300.pkl or our JSON cache)")
    parser.add_argument("--synonyms", help="object vocabulary file in the reference's format (default: COCO)")
    parser.add_argument(
        "--nlp",
        default="nltk",
        choices=("nltk", "builtin"),
        help="CHAIR text backend (builtin: offline, not comparable to published numbers)",
    )
    parser.add_argument(
        "--strategies", nargs="+", default=["greedy", "sampling", "beam"], help="in table order"
    )
    parser.add_argument(
        "--out", default="decoding_comparison", help="folder of the answers, CHAIR details and the report"
    )
    add_hidden_alias(parser, "--out-dir", "out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed set before each strategy (sampling)")
    parser.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks before the model is loaded."""
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    if not Path(args.questions).is_file():
        raise ValueError(f"--questions: file not found: {args.questions}")
    if args.coco_path is None and args.cache is None:
        raise ValueError("CHAIR needs ground truth: give --coco-path or --cache")


def run(args: argparse.Namespace) -> int:
    import torch

    from mllm.eval.answer import model_answer_fn
    from mllm.eval.chair import load_evaluator
    from mllm.eval.chair_nlp import MissingNLTKResourceError
    from mllm.eval.compare_decoding import (
        ComparisonSettings,
        compare_decoding,
        markdown_table,
        validate_strategies,
    )

    check_args(args)
    strategies = validate_strategies(args.strategies)
    try:  # ground truth (and NLTK data) first: a missing resource should not cost a model load
        evaluator = load_evaluator(args.coco_path, args.cache, args.synonyms, args.nlp)
    except MissingNLTKResourceError as exc:
        raise ValueError(str(exc)) from exc
    model, processor = load_from_args(args)  # any family (mllm.vlm)

    def make_answer_fn(strategy: str, generation_kwargs: dict):
        torch.manual_seed(args.seed)
        return model_answer_fn(model, processor, generation_kwargs)

    settings = ComparisonSettings(
        model=str(Path(args.model).resolve()),
        questions=str(args.questions),
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    results = compare_decoding(args.questions, args.out, make_answer_fn, evaluator, settings, strategies)
    print(markdown_table(results))
    print(f"report: {Path(args.out) / 'decoding_comparison.md'} (+ .json, .png)")
    return 0
