"""`mllm eval chair|vqa|grounding|decoding`, the evaluations as one command group, and `mllm ground MODEL --image IMG
"expression"` (one box, printed in pixels and drawn).

`mllm eval grounding MODEL --data REC.jsonl ...` (Acc@0.5 per RefCOCO split, resumable, with pictures) is defined
here; chair, vqa and decoding in their own modules. Their older top-level names (`mllm chair`, `mllm eval-vqa`,
`mllm compare-decoding`) stay as hidden aliases with the same flags."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mllm.boxes import BOX_FORMATS  # a light module: re only
from mllm.cli import chair, compare, vqa
from mllm.cli.common import (
    add_hidden_alias,
    add_model_argument,
    add_model_flags,
    add_overwrite_flag,
    load_from_args,
    output_fingerprint,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Where is {expr} in image? answer in [x0,y0,x1,y1] format."  # = mllm.eval.grounding_run.DEFAULT_PROMPT
)


TASKS = {
    # task: (module with HELP, DESCRIPTION, add_arguments(parser) and run(args); its older top-level name)
    "chair": (chair, "chair"),
    "vqa": (vqa, "eval-vqa"),
    "decoding": (compare, "compare-decoding"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("eval", help="evaluate: chair, vqa, grounding, decoding")
    tasks = group.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for name, (module, old_name) in TASKS.items():
        module.add_arguments(tasks.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
        module.add_arguments(
            subparsers.add_parser(old_name, description=module.DESCRIPTION)
        )  # hidden: no help
    _register_grounding(tasks)
    _register_ground(subparsers)


def _add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="question template with {expr} (default: the exercise's)"
    )
    parser.add_argument(
        "--box-format",
        default="auto",
        choices=BOX_FORMATS,
        help="how the model writes boxes (auto: Qwen's <box>(x,y),(x,y)</box> or Qwen2-VL's <|box_start|> tags if "
        "present, else [x0,y0,x1,y1] on the 0..1000 grid, or 0..1 floats; qwen25vl: Qwen2.5-VL's pixels)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (default 64)")
    parser.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")
    add_model_flags(parser)


def _register_grounding(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser(
        "grounding",
        help="referring-expression comprehension on Shikra REC jsonl files: Acc@0.5 per split (resumable)",
        description="Batched greedy answers to 'Where is {expr} ...' for every line of each --data file, "
        "appended to OUT_DIR/<file>.predictions.jsonl (a rerun skips answered lines), then Acc@IoU0.5 per split: "
        "OUT_DIR/summary.md, OUT_DIR/summary.json and --vis pictures in OUT_DIR/vis/.",
    )
    add_model_argument(p, optional=True, help="model directory (not needed with --predictions)")
    p.add_argument("--data", type=Path, action="append", default=[], help="Shikra REC jsonl (repeatable)")
    p.add_argument(
        "--predictions",
        type=Path,
        action="append",
        default=[],
        help="score existing predictions jsonl files instead of running a model (repeatable)",
    )
    p.add_argument(
        "--image-root", type=Path, default=None, help="folder of img_path (default: each data file's folder)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the predictions, summary and pictures (default: eval_grounding/<model dir name> here)",
    )
    add_hidden_alias(p, "--out-dir", "out", Path)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only the first N lines of each data file")
    p.add_argument("--vis", type=int, default=0, help="draw N pictures (spread over the splits)")
    add_overwrite_flag(p)
    _add_shared_flags(p)
    p.set_defaults(func=run_eval_grounding)


def _register_ground(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ground", help="find one expression in one image: print the box in pixels and draw it"
    )
    add_model_argument(p)
    p.add_argument("expression", help='what to find, e.g. "the man in the red shirt"')
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: <image stem>_ground.png)")
    _add_shared_flags(p)
    p.set_defaults(func=run_ground)


def run_eval_grounding(args: argparse.Namespace) -> int:
    from mllm.eval.grounding_run import GroundingEvalConfig, evaluate_grounding, score_and_report

    if bool(args.data) == bool(args.predictions):
        raise ValueError("give either --data (run the model) or --predictions (score existing answers)")
    if args.data and args.model is None:
        raise ValueError("MODEL is needed with --data")
    name = Path(args.model).name if args.model else "predictions"
    config = GroundingEvalConfig(
        data=args.data or args.predictions,
        out_dir=Path(args.out) if args.out else Path("eval_grounding") / name,
        image_root=args.image_root,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        vis=args.vis,
        box_format=args.box_format,
        overwrite=args.overwrite,
        max_image_pixels=args.max_image_pixels,
    )
    if args.predictions:
        for path in args.predictions:
            if not path.is_file():
                raise ValueError(f"--predictions: file not found: {path}")
        config.validate()
        result = score_and_report([(p, args.image_root) for p in args.predictions], config)
    else:
        config.validate()
        answer_fn, model = _answer_fn(args)
        fingerprint = output_fingerprint(args, model, max_slice_nums=args.max_slice_nums)
        result = evaluate_grounding(config, answer_fn, name, fingerprint)
        for run in result.runs:
            print(
                f"{run.data}: answered {run.answered}, skipped {run.skipped} (already done), "
                f"failed {run.failed}; {run.seconds:.1f}s"
            )
    print(result.table)
    print(f"summary: {Path(config.out_dir) / 'summary.json'}; pictures: {len(result.pictures)}")
    return 0


def _answer_fn(args: argparse.Namespace):
    """(greedy answer function, model) of `args.model`, whatever its family."""
    from mllm.eval.answer import model_answer_fn
    from mllm.model.chat import decoding_kwargs

    model, processor = load_from_args(args)
    return model_answer_fn(
        model, processor, decoding_kwargs("greedy", max_new_tokens=args.max_new_tokens)
    ), model


def run_ground(args: argparse.Namespace) -> int:
    from mllm.eval.grounding_run import ground_one
    from mllm.eval.grounding_score import visualize
    from mllm.io import open_image

    image = open_image(
        args.image, f"--image {args.image}", args.max_image_pixels
    )  # RecordError: a ValueError
    answer_fn, _ = _answer_fn(args)
    answer, box = ground_one(answer_fn, image, args.expression, args.prompt, args.box_format)
    out = args.out or Path(f"{args.image.stem}_ground.png")
    if out.exists():
        logger.warning("overwriting %s", out)
    visualize(image, args.expression, None, box, None, out)
    pixels = None if box is None else [round(v, 1) for v in box]
    print(
        json.dumps(
            {"expression": args.expression, "answer": answer, "box_pixels": pixels, "picture": str(out)}
        )
    )
    return 0 if box is not None else 1
