"""`mllm prepare-grounding` (Shikra-format data -> SFT conversations) and `mllm score-grounding`
(Acc@0.5 per RefCOCO split from a predictions file, with optional pictures)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from mllm.boxes import BOX_FORMATS, OUTPUT_BOX_FORMATS
from mllm.cli.common import add_hidden_alias

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_prepare(subparsers)
    _register_score(subparsers)


def _register_prepare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare-grounding",
        help="Shikra-format REC/GC/Flickr30k jsonl + templates -> SFT-format grounding conversations.",
        description="Write SFT-format conversations for referring-expression comprehension, grounded captioning "
        "and phrase grounding. Boxes are written as [x0, y0, x1, y1] on a 0..1000 grid (see mllm.boxes).",
    )
    p.add_argument("--rec", type=Path, action="append", default=[], help="Shikra REC jsonl (repeatable).")
    p.add_argument("--gc", type=Path, action="append", default=[], help="Shikra GC jsonl (repeatable).")
    p.add_argument(
        "--flickr", type=Path, action="append", default=[], help="Flickr30k-entities jsonl (repeatable)."
    )
    p.add_argument(
        "--rec-templates", type=Path, help="JSON list of REC templates (default: the eval prompt)."
    )
    p.add_argument("--gc-templates", type=Path, help="JSON list of GC templates.")
    p.add_argument("--flickr-templates", type=Path, help="JSON list of phrase-grounding templates.")
    p.add_argument(
        "--image-root", type=Path, help="Folder of the images (default: each jsonl file's folder)."
    )
    p.add_argument("--out", type=Path, required=True, help="Output JSON file.")
    p.add_argument(
        "--seed", type=int, default=0, help="Seed of the template draws and the mixing (default 0)."
    )
    p.add_argument("--mix-sft", type=Path, help="General SFT-format JSON file to mix in.")
    p.add_argument("--mix-ratio", type=float, default=0.0, help="SFT items per grounding item (default 0).")
    p.add_argument(
        "--mix-image-root",
        dest="mix_image_folder",
        type=Path,
        help="Image folder of --mix-sft (default: its folder).",
    )
    add_hidden_alias(p, "--mix-image-folder", "mix_image_folder", Path)
    p.add_argument(
        "--box-format",
        default="mllm",
        choices=OUTPUT_BOX_FORMATS,
        help="Box syntax written: ours (mllm), Qwen-VL's, Shikra's, or a target family's (llava, qwen2vl, qwen25vl).",
    )
    p.add_argument(
        "--box-bins",
        type=int,
        default=0,
        help="Snap each box coordinate to the nearest of N equal steps of the image side (20: mllm values in "
        "multiples of 50); coarser targets learn faster, small objects lose precision (default 0: exact).",
    )
    p.add_argument("--ref-tags", action="store_true", help="Wrap expressions and phrases in <ref>...</ref>.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out file.")
    p.set_defaults(func=run_prepare)


def _register_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score-grounding",
        help="Acc@IoU0.5 per split of a grounding predictions jsonl; markdown table, JSON summary, pictures.",
    )
    p.add_argument(
        "--predictions", type=Path, action="append", required=True, help="Predictions jsonl (repeatable)."
    )
    p.add_argument("--split", help="Split name for lines without `split` (default: from the file name).")
    p.add_argument(
        "--box-format",
        default="auto",
        choices=BOX_FORMATS,
        help="Answer syntax (qwen25vl: pixels, see boxes).",
    )
    p.add_argument("--out", type=Path, help="Write summary.json, summary.md and vis/ to this folder.")
    add_hidden_alias(p, "--out-dir", "out", Path)
    p.add_argument("--vis", type=int, default=0, help="Draw the first N items as PNGs (needs --out).")
    p.add_argument("--image-root", type=Path, help="Folder of the images named by `img_path`/`image`.")
    p.set_defaults(func=run_score)


def run_prepare(args: argparse.Namespace) -> int:
    from mllm.data.grounding import GroundingPrepConfig, prepare_grounding

    if args.mix_ratio > 0 and args.mix_sft is None:
        raise ValueError("--mix-ratio needs --mix-sft FILE")
    config = GroundingPrepConfig(
        out=args.out,
        rec_files=args.rec,
        gc_files=args.gc,
        flickr_files=args.flickr,
        rec_templates=args.rec_templates,
        gc_templates=args.gc_templates,
        flickr_templates=args.flickr_templates,
        image_root=args.image_root,
        seed=args.seed,
        mix_sft=args.mix_sft,
        mix_ratio=args.mix_ratio,
        mix_image_folder=args.mix_image_folder,
        box_format=args.box_format,
        box_bins=args.box_bins,
        ref_tags=args.ref_tags,
        overwrite=args.overwrite,
    )
    stats = prepare_grounding(config)
    print(json.dumps({"out": str(args.out), **asdict(stats)}, indent=2))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from mllm.eval.grounding_score import markdown_table, score_predictions, visualize_items

    if args.vis and args.out is None:
        raise ValueError("--vis needs --out")
    summary = score_predictions(
        args.predictions, box_format=args.box_format, split=args.split, image_root=args.image_root
    )
    table = markdown_table(summary)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        public = {k: v for k, v in summary.items() if k != "items"}
        (args.out / "summary.json").write_text(json.dumps(public, indent=2) + "\n", encoding="utf-8")
        (args.out / "summary.md").write_text(table + "\n", encoding="utf-8")
        if args.vis:
            written = visualize_items(summary["items"][: args.vis], args.out / "vis")
            logger.info("wrote %d pictures to %s", len(written), args.out / "vis")
    return 0
