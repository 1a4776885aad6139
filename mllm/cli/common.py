"""Flags and loading shared by the commands. The spellings are the same everywhere: the model directory is the first
positional argument (MODEL), outputs are `--out`, image folders `--image-root`; the older spellings of a command
(`--save-path`, `--out-dir`, `--image-folder`, `--model`) stay accepted as hidden aliases (`add_hidden_alias`)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")  # = mllm.api.DTYPES (no import at CLI build time)


def add_model_argument(
    parser: argparse.ArgumentParser, optional: bool = False, legacy_option: str | None = None, help: str = ""
) -> None:
    """The model directory as the first positional argument MODEL (`args.model`). `optional`: the command can do
    without one (e.g. scoring existing predictions). `legacy_option` (e.g. "--model"): an older spelling, hidden,
    that `mllm.cli.main` folds into `args.model`."""
    text = help or "model directory (config.json, weights, tokenizer, preprocessor_config.json)"
    if optional or legacy_option:
        parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=text)
    else:
        parser.add_argument("model", metavar="MODEL", help=text)
    if legacy_option:
        parser.add_argument(legacy_option, dest="legacy_model", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(model_required=not optional)


def add_hidden_alias(parser: argparse.ArgumentParser, option: str, dest: str, type=None) -> None:
    """An older spelling of a flag (e.g. `--out-dir` for `--out`, with the flag's `type`), accepted and not listed
    in --help."""
    parser.add_argument(option, dest=dest, type=type, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_image_root_flag(parser: argparse.ArgumentParser, help: str, legacy: str | None = None) -> None:
    """--image-root (the folder relative image paths start from) and its older spelling, hidden."""
    parser.add_argument("--image-root", default=None, help=help)
    if legacy:
        add_hidden_alias(parser, legacy, "image_root")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument(
        "--attn-implementation", default="sdpa", choices=("eager", "sdpa", "flash_attention_2")
    )
    add_image_pixels_flag(parser)


MAX_IMAGE_PIXELS_DEFAULT = (
    64 * 1024 * 1024
)  # = mllm.io.DEFAULT_MAX_IMAGE_PIXELS (no import at CLI build time)


def image_pixels(text: str) -> int:
    """`--max-image-pixels`: a positive int, at most Pillow's decompression-bomb limit (mllm.io.check_max_image_pixels)."""
    from mllm.io import check_max_image_pixels

    try:
        return check_max_image_pixels(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_image_pixels_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-image-pixels",
        type=image_pixels,
        default=MAX_IMAGE_PIXELS_DEFAULT,
        help="largest image (width x height) decoded; bigger ones and decompression bombs are refused as bad "
        f"records, from their header (default {MAX_IMAGE_PIXELS_DEFAULT} = 8192x8192)",
    )


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: empty an existing output made with other inputs or settings (refused without it)",
    )


def output_fingerprint(args: argparse.Namespace, model, **settings) -> dict:
    """What an output of a model command depends on besides its input file: the model directory's files, the
    dtype the weights run in, the image pixel cap and the command's own settings (decoding, slicing...)."""
    from mllm.io import model_fingerprint, tokenizer_fingerprint

    return {
        "model": model_fingerprint(args.model),
        "tokenizer": tokenizer_fingerprint(args.model),
        "dtype": str(next(model.parameters()).dtype),
        "max_image_pixels": args.max_image_pixels,
        **settings,
    }


def add_listen_flags(parser: argparse.ArgumentParser, port: int, what: str) -> None:
    """--host (this machine only unless told) and --port of a server command."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 exposes the {what})",
    )
    parser.add_argument("--port", type=int, default=port)


def add_decoding_flags(parser: argparse.ArgumentParser, default_strategy: str = "greedy") -> None:
    parser.add_argument("--strategy", default=default_strategy, choices=("greedy", "sampling", "beam"))
    parser.add_argument("--num-beams", type=int, default=None, help="beams for --strategy beam (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampling)")
    parser.add_argument("--max-slice-nums", type=int, default=None, help="override the processor's slicing")


def generation_kwargs_from_args(args: argparse.Namespace) -> dict:
    from mllm.model.chat import decoding_kwargs

    return decoding_kwargs(
        args.strategy,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


def load_from_args(args: argparse.Namespace, device: str | None = None):
    """(model, processor) of `args.model` through the front door (`mllm.load`) with the --device, --dtype,
    --attn-implementation and --max-slice-nums flags (the last one only when the command has it)."""
    from mllm.api import load

    return load(
        args.model,
        device=device or args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        max_slice_nums=getattr(args, "max_slice_nums", None),
    )
