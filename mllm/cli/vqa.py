"""`mllm eval vqa MODEL --data test.json` (older spelling: `mllm eval-vqa`): batched greedy answers to an SFT-format yes/no test set, accuracy
overall and per category, a resumable predictions jsonl and a markdown/JSON report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mllm.cli.common import (
    add_image_root_flag,
    add_model_argument,
    add_model_flags,
    add_overwrite_flag,
    load_from_args,
    output_fingerprint,
)

logger = logging.getLogger(__name__)


HELP = "yes/no accuracy of a model on an SFT-format test file (overall and per category)"
DESCRIPTION = (
    "Answers the first user turn of every item with greedy decoding and compares the first word with the first "
    "assistant turn. Writes predictions (resumable) and <out stem>.accuracy.md/.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--data", required=True, help="SFT-format JSON list (e.g. data/test.json)")
    add_image_root_flag(
        parser, "image paths are relative to it (default: the JSON's folder)", legacy="--image-folder"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--out",
        default=None,
        help="predictions jsonl, appended and resumed (default: eval_vqa_<model>_<data>.jsonl here)",
    )
    add_overwrite_flag(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="a yes/no answer needs only a few")
    parser.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")
    add_model_flags(parser)
    parser.set_defaults(func=run)


def default_out(model: str, data: str) -> Path:
    return Path(f"eval_vqa_{Path(model).resolve().name}_{Path(data).stem}.jsonl")


def run(args: argparse.Namespace) -> int:
    from mllm.eval.vqa import (
        load_vqa_items,
        model_vqa_fn,
        predict,
        report_markdown,
        report_paths,
        score_predictions,
    )
    from mllm.io import file_fingerprint, write_json_atomic
    from mllm.model.modeling import MLLMModel

    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    items = load_vqa_items(args.data, args.image_root, args.limit)  # bad data fails before the model loads
    out = Path(args.out) if args.out else default_out(args.model, args.data)
    model, processor = load_from_args(args)
    if not isinstance(model, MLLMModel):
        raise ValueError(f"{args.model}: eval vqa runs MiniCPM-V models (model_type mllm or minicpmv) only")
    answer_fn = model_vqa_fn(model, processor, args.max_new_tokens, args.max_image_pixels)
    model_name = str(Path(args.model).resolve())
    fingerprint = output_fingerprint(
        args,
        model,
        data=file_fingerprint(args.data),
        max_new_tokens=args.max_new_tokens,
        max_slice_nums=args.max_slice_nums,
    )
    records = predict(items, out, answer_fn, model_name, args.batch_size, fingerprint, args.overwrite)
    report = score_predictions(records)
    markdown = report_markdown(report, f"Yes/no accuracy of {Path(args.model).name} on {args.data}")
    md_path, json_path = report_paths(out)
    md_path.write_text(markdown, encoding="utf-8")
    write_json_atomic(json_path, {"model": model_name, "data": str(args.data), **report.to_json()})
    print(markdown, end="")
    print(f"predictions: {out}; report: {md_path} (+ {json_path.name})")
    return 0
