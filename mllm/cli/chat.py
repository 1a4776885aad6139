"""`mllm chat MODEL [--image IMG ...] [QUESTION]` and `mllm answer MODEL --questions Q.jsonl --out A.jsonl`, for
every model family `mllm.load` reads."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mllm.cli.common import (
    add_decoding_flags,
    add_model_argument,
    add_model_flags,
    add_overwrite_flag,
    generation_kwargs_from_args,
    load_from_args,
    output_fingerprint,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser(
        "chat", help="ask a model about images (one question, or an interactive session without one)"
    )
    add_model_argument(chat)
    chat.add_argument("question", nargs="?", default=None, help="omit for an interactive, streamed session")
    chat.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    add_model_flags(chat)
    add_decoding_flags(chat)
    add_fast_flag(chat)
    chat.set_defaults(func=run_chat, extra_positional="question")

    answer = subparsers.add_parser(
        "answer", help="answer every question of an objhal_bench-format jsonl (resumable)"
    )
    add_model_argument(answer)
    answer.add_argument("--questions", required=True, help="objhal_bench-format jsonl")
    answer.add_argument(
        "--out",
        required=True,
        help="answers jsonl (appended; finished items are skipped; another run's output is refused)",
    )
    add_overwrite_flag(answer)
    answer.add_argument("--batch-size", type=int, default=8)
    answer.add_argument("--limit", type=int, default=None, help="only the first N lines")
    answer.add_argument(
        "--model-name", default=None, help="value of the 'model' field (default: the model dir)"
    )
    answer.add_argument(
        "--no-length-bucketing",
        action="store_true",
        help="batch in file order instead of sorting pending items by prompt length",
    )
    add_model_flags(answer)
    add_decoding_flags(answer)
    add_fast_flag(answer)
    answer.set_defaults(func=run_answer)


def add_fast_flag(parser: argparse.ArgumentParser) -> None:
    engine = parser.add_mutually_exclusive_group()
    engine.add_argument(
        "--fast-generate",
        action="store_true",
        help="our static KV cache decoder (compiled decode step on CUDA); same tokens as the default path",
    )
    engine.add_argument(
        "--static-cache",
        action="store_true",
        help="transformers' generate with its static KV cache (it compiles the forward of greedy and sampling on "
        "CUDA); same tokens as the default path",
    )


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs = generation_kwargs_from_args(args)
    if args.fast_generate:
        kwargs["fast"] = True
    if args.static_cache:
        kwargs["cache_implementation"] = "static"
    return kwargs


def _distributed_shard() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain run."""
    import os

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world_size, local_rank


def _open_images(paths: list[str], max_pixels: int):
    from mllm.io import RecordError, open_image

    images = []
    for path in paths:
        try:
            images.append(open_image(path, f"--image {path}", max_pixels))
        except RecordError as exc:
            raise SystemExit(f"cannot read the image: {exc}") from exc
    return images


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from mllm.model.chat import chat, model_max_length
    from mllm.model.modeling import MLLMModel

    torch.manual_seed(args.seed)
    images = _open_images(args.image, args.max_image_pixels)
    model, processor = load_from_args(args)
    if not isinstance(model, MLLMModel):
        return _chat_other_family(args, model, processor, images)
    kwargs = _generation_kwargs(args)
    limits = {"max_length": model_max_length(model)}
    first = [{"role": "user", "content": [*images, args.question] if images else args.question}]
    if args.question is not None:
        print(chat(model, None, first, processor.tokenizer, processor, **limits, **kwargs))
        return 0

    def reply(history: list[dict]):
        kwargs_stream = {k: v for k, v in kwargs.items() if k != "fast"}  # streaming runs the plain path
        if kwargs_stream.get("num_beams", 1) > 1:
            kwargs_stream["num_beams"] = 1
        return chat(
            model, None, history, processor.tokenizer, processor, stream=True, **limits, **kwargs_stream
        )

    return _interactive(images, reply)


def _interactive(images: list, reply) -> int:
    """The interactive session: each question (the images go with the first) is added to the history and
    `reply(history)` returns the model's answer as an iterable of text pieces, printed after "model> " as they come.
    A ValueError from `reply` (a prompt over the model's length, control tokens) is printed and the question asked
    again; the history keeps only answered turns."""
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
        turn = {"role": "user", "content": [*pending_images, question] if pending_images else question}
        try:
            pieces = reply([*history, turn])
        except ValueError as exc:
            print(f"error: {exc}")
            continue
        print("model> ", end="", flush=True)
        answer = []
        for piece in pieces:
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        history += [turn, {"role": "assistant", "content": "".join(answer).strip()}]
        pending_images = []
    return 0


def _chat_other_family(args: argparse.Namespace, model, processor, images: list) -> int:
    """`mllm chat` for a LLaVA / Qwen2-VL / BLIP-family directory (`mllm.vlm`): the same flags, answers printed
    whole (no streaming)."""
    from mllm.vlm import as_vlm

    if args.fast_generate:
        raise ValueError("--fast-generate is the MiniCPM-V decoding path; leave it out for this model family")
    vlm = as_vlm(model, processor)
    kwargs = generation_kwargs_from_args(args)
    first = {"role": "user", "content": [*images, args.question] if images else args.question}
    if args.question is not None:
        print(vlm.answer([[first]], **kwargs)[0])
        return 0

    def reply(history: list[dict]) -> list[str]:
        return [vlm.answer([history], **kwargs)[0]]

    return _interactive(images, reply)


def run_answer(args: argparse.Namespace) -> int:
    import torch

    from mllm.eval.answer import generate_answers, model_answer_fn

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    rank, world_size, local_rank = _distributed_shard()
    device = args.device
    if world_size > 1 and device is None and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # one GPU per rank under torchrun
    torch.manual_seed(args.seed + rank)
    kwargs = _generation_kwargs(args)
    model, processor = load_from_args(args, device)
    answer_fn = model_answer_fn(model, processor, kwargs)
    fingerprint = output_fingerprint(
        args,
        model,
        generation={k: v for k, v in kwargs.items() if k != "fast"},
        seed=args.seed if kwargs.get("do_sample") else None,  # only sampling depends on it
        max_slice_nums=args.max_slice_nums,
    )
    barrier = _start_process_group() if world_size > 1 else None
    try:
        summary = generate_answers(
            args.questions,
            args.out,
            answer_fn,
            args.model_name or Path(args.model).name,
            args.batch_size,
            args.limit,
            length_fn=None if args.no_length_bucketing else getattr(answer_fn, "prompt_length", None),
            shard=(rank, world_size),
            barrier=barrier,
            fingerprint=fingerprint,
            overwrite=args.overwrite,
            max_image_pixels=args.max_image_pixels,
        )
    finally:
        if barrier is not None:
            torch.distributed.destroy_process_group()
    print(f"[rank {rank}/{world_size}] {summary.line()}" if world_size > 1 else summary.line())
    return 0


def _start_process_group():
    """A gloo group only for the end-of-run barrier (ranks finish at different times, so the timeout is long)."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    return dist.barrier
