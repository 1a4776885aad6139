"""`mllm web MODEL`: the chat page (Gradio, from the optional extra `web`)."""

from __future__ import annotations

import argparse

from mllm.cli.common import add_listen_flags, add_model_argument, add_model_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    web = subparsers.add_parser(
        "web", help="serve a chat page for a model directory (needs the extra: pip install -e '.[web]')"
    )
    add_model_argument(web)
    add_listen_flags(web, 7860, "page")
    web.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longest prompt in tokens (default: the model's positions)",
    )
    web.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")
    add_model_flags(web)
    web.set_defaults(func=run_web)


def run_web(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    from mllm.web.app import serve

    if find_spec("gradio") is None:
        raise SystemExit("mllm web needs gradio, from the optional extra: pip install -e '.[web]'")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        max_length=args.max_length,
        max_slice_nums=args.max_slice_nums,
        max_image_pixels=args.max_image_pixels,
    )
    return 0
