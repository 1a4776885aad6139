"""`mllm serve MODEL`: the OpenAI-compatible API (FastAPI + uvicorn, from the optional extra `serve`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mllm.cli.common import add_listen_flags, add_model_argument, add_model_flags, load_from_args

API_KEY_ENV = "MLLM_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model directory over the OpenAI chat-completions API (pip install -e '.[serve]')",
    )
    add_model_argument(serve)
    add_listen_flags(serve, 8000, "API")
    serve.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV} when set, else no key)",
    )
    serve.add_argument(
        "--served-model-name", default=None, help="model id of the API (default: the folder name)"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=8, help="sequences decoded together (1: one at a time)"
    )
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=100.0,
        help="longest wait for requests still arriving (being read and prepared) before a batch starts",
    )
    serve.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="prompt + answer tokens (default: the model's positions)",
    )
    serve.add_argument(
        "--default-max-tokens", type=int, default=256, help="answer tokens when a request names none"
    )
    serve.add_argument(
        "--max-request-bytes", type=int, default=32 * 2**20, help="largest request body (413 above)"
    )
    serve.add_argument(
        "--max-request-pixels",
        type=int,
        default=40_000_000,
        help="pixels of all images of a request together (413 above; --max-image-pixels caps each one)",
    )
    serve.add_argument(
        "--allowed-local-media-path",
        type=Path,
        default=None,
        help="folder whose images requests may name as file:// URLs (default: none)",
    )
    serve.add_argument("--max-beams", type=int, default=8, help="largest num_beams a request may ask for")
    serve.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")
    add_model_flags(serve)
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise SystemExit(
            "mllm serve needs fastapi and uvicorn, from the optional extra: pip install -e '.[serve]'"
        )
    from mllm.model.modeling import MLLMModel
    from mllm.serve.app import run_server
    from mllm.serve.config import ServeConfig

    config = ServeConfig(
        model_name=args.served_model_name or Path(args.model).resolve().name,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        max_request_bytes=args.max_request_bytes,
        max_request_pixels=args.max_request_pixels,
        max_image_pixels=args.max_image_pixels,
        allowed_local_media_path=args.allowed_local_media_path,
        max_beams=args.max_beams,
    )
    model, processor = load_from_args(args)
    if not isinstance(model, MLLMModel):
        raise ValueError(f"{args.model}: mllm serve runs MiniCPM-V models (model_type mllm or minicpmv) only")
    run_server(model, processor, config)
    return 0
