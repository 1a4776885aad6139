"""`mllm demo [--out runs/demo] [--fast] [--profile NAME] [--seed N] [--set FIELD=VALUE ...] [--until STAGE]`: the
whole toy-world pipeline, resumable, ending in REPORT.md."""

from __future__ import annotations

import argparse
import os

from mllm.demo.config import PROFILES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model from scratch on the toy world and evaluate it (SFT, CHAIR, grounding, NCA)",
        description="Makes the toy world, a tokenizer and a random tiny model, trains its vision tower on the "
        "world's boxes, runs SFT on the mixed data (yes/no, short answers, descriptions, grounding), evaluates "
        "(yes/no, CHAIR greedy and sampled, grounding Acc@0.5), computes reference log-probs, runs preference "
        "training, evaluates again and writes OUT/REPORT.md. Finished stages (OUT/<stage>/done.json) are skipped on "
        "a re-run; an interrupted training resumes from its last checkpoint.",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--fast", action="store_true", help="the small CI-sized version (a few minutes)")
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="recipe",
        help="named settings (mllm.demo.config.PROFILES): recipe (default, ~15 minutes on 2 cores), grounded "
        "(boxes above every image-blind rule; ~25 minutes), or grounded_large (the same on fewer, larger objects "
        "with the speed levers: Acc@0.5 above 30%%; ~30 minutes); --set changes them further",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the model and training")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (default 2)")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="processes of the training stages (DDP), each with threads/processes threads; 0 (default): one per "
        "thread on CPU, 1 on CUDA",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto (default): CUDA when torch sees a GPU",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change one field of the demo's settings (mllm.demo.config.DemoConfig), e.g. --set sft_steps=1500 "
        "--set vision_row_boxes=true; repeatable. A folder keeps the settings it was started with: another value "
        "needs another --out",
    )
    parser.add_argument(
        "--until",
        metavar="STAGE",
        help="stop after this stage (e.g. questions, to probe the model a stage leaves); a re-run without it goes on",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Before torch starts its OpenMP pool: waiting threads must sleep, or on a shared 2-core machine they spin
    # and starve the other process's work.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mllm.demo.config import demo_config, parse_setting
    from mllm.demo.pipeline import run_demo

    settings = dict(parse_setting(text) for text in args.set)
    run_demo(
        demo_config(
            args.out,
            fast=args.fast,
            seed=args.seed,
            profile=args.profile,
            threads=args.threads,
            processes=args.processes,
            device=args.device,
            **settings,
        ),
        until=args.until,
    )
    return 0
