"""`mllm eval chair --answers A.jsonl`: score an answers file with the CHAIR object-hallucination metric, as the
reference script does (`mllm chair`, with `--save-path` for `--out`, is the older spelling)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mllm.cli.common import add_hidden_alias

logger = logging.getLogger(__name__)


HELP = "Score answers with the CHAIR object-hallucination metric."
DESCRIPTION = "CHAIRs, CHAIRi, Recall and Len of an answers file against COCO 2014 ground truth."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--answers", required=True, help="Answers file (.jsonl, one object a line, or a .json list)."
    )
    parser.add_argument(
        "--coco-path",
        help="Folder with COCO 2014 instances_/captions_{train,val}2014.json (or its annotations/).",
    )
    parser.add_argument(
        "--cache",
        help="Ground-truth cache: the reference's chair_300.pkl or our JSON cache; built here from --coco-path "
        "if missing (default with --coco-path: the user cache folder).",
    )
    parser.add_argument("--out", help="Write overall metrics and per-caption details to this JSON file.")
    add_hidden_alias(parser, "--save-path", "out")
    parser.add_argument("--overwrite", action="store_true", help="Allow replacing an existing --out.")
    parser.add_argument(
        "--image-id-key", default="image_id", help="Key of the image id (top level or metainfos)."
    )
    parser.add_argument("--caption-key", default="answer", help="Key of the caption to score.")
    parser.add_argument(
        "--synonyms", help="Object vocabulary file in the reference's format (default: COCO's 80)."
    )
    parser.add_argument(
        "--nlp",
        default="nltk",
        choices=["nltk", "builtin"],
        help="nltk = the reference's (needs NLTK data); builtin = offline, numbers not comparable to published ones.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mllm.eval.chair import evaluate_chair, format_metrics
    from mllm.eval.chair_nlp import MissingNLTKResourceError
    from mllm.io import write_json_atomic

    if args.out and Path(args.out).exists() and not args.overwrite:
        print(
            f"mllm eval chair: error: --out {args.out} exists; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    try:
        result = evaluate_chair(
            args.answers,
            coco_path=args.coco_path,
            cache=args.cache,
            synonyms=args.synonyms,
            nlp=args.nlp,
            image_id_key=args.image_id_key,
            caption_key=args.caption_key,
        )
    except (ValueError, MissingNLTKResourceError) as error:
        print(f"mllm eval chair: error: {error}", file=sys.stderr)
        return 2
    print(f"CHAIR of {len(result['sentences'])} captions (--nlp {result['nlp_backend']})")
    print(format_metrics(result["overall_metrics"]))
    if args.out:
        write_json_atomic(args.out, result)
        logger.info("CHAIR details written to %s", args.out)
    return 0
