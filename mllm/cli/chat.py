"""`mllm chat MODEL_DIR [--image IMG ...] [QUESTION]` and `mllm answer MODEL_DIR --questions Q.jsonl --out A.jsonl`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mllm.cli.common import (
    add_decoding_flags,
    add_model_flags,
    generation_kwargs_from_args,
    load_model_and_processor,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser(
        "chat", help="ask a model about images (one question, or an interactive session without one)"
    )
    chat.add_argument("model_dir")
    chat.add_argument("question", nargs="?", default=None, help="omit for an interactive, streamed session")
    chat.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    add_model_flags(chat)
    add_decoding_flags(chat)
    chat.set_defaults(func=run_chat)

    answer = subparsers.add_parser(
        "answer", help="answer every question of an objhal_bench-format jsonl (resumable)"
    )
    answer.add_argument("model_dir")
    answer.add_argument("--questions", required=True, help="objhal_bench-format jsonl")
    answer.add_argument("--out", required=True, help="answers jsonl (appended; finished items are skipped)")
    answer.add_argument("--batch-size", type=int, default=8)
    answer.add_argument("--limit", type=int, default=None, help="only the first N lines")
    answer.add_argument(
        "--model-name", default=None, help="value of the 'model' field (default: the model dir)"
    )
    add_model_flags(answer)
    add_decoding_flags(answer)
    answer.set_defaults(func=run_answer)


def _open_images(paths: list[str]):
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, FileNotFoundError) as exc:
            raise SystemExit(f"--image {path}: cannot read the image ({exc})") from exc
    return images


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from mllm.model.chat import chat

    torch.manual_seed(args.seed)
    images = _open_images(args.image)
    model, processor = load_model_and_processor(
        args.model_dir, args.device, args.dtype, args.attn_implementation
    )
    kwargs = generation_kwargs_from_args(args)
    first = [{"role": "user", "content": [*images, args.question] if images else args.question}]
    if args.question is not None:
        print(
            chat(
                model,
                None,
                first,
                processor.tokenizer,
                processor,
                max_slice_nums=args.max_slice_nums,
                **kwargs,
            )
        )
        return 0
    history: list[dict] = []
    pending_images = images
    print("Interactive chat: empty line or Ctrl-D to quit.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        content = [*pending_images, question] if pending_images else question
        pending_images = []
        history.append({"role": "user", "content": content})
        kwargs_stream = {**kwargs, "num_beams": 1} if kwargs.get("num_beams", 1) > 1 else kwargs
        streamer = chat(
            model,
            None,
            history,
            processor.tokenizer,
            processor,
            stream=True,
            max_slice_nums=args.max_slice_nums,
            **kwargs_stream,
        )
        print("model> ", end="", flush=True)
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
    return 0


def run_answer(args: argparse.Namespace) -> int:
    import torch

    from mllm.eval.answer import generate_answers, model_answer_fn

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    torch.manual_seed(args.seed)
    model, processor = load_model_and_processor(
        args.model_dir, args.device, args.dtype, args.attn_implementation
    )
    answer_fn = model_answer_fn(model, processor, generation_kwargs_from_args(args), args.max_slice_nums)
    summary = generate_answers(
        args.questions,
        args.out,
        answer_fn,
        args.model_name or Path(args.model_dir).name,
        args.batch_size,
        args.limit,
    )
    print(summary.line())
    return 0
