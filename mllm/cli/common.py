"""Flags and loading shared by the inference commands (chat, answer, eval, ground, web)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "float32", "bfloat16", "float16")


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

    model_dir = getattr(args, "model_dir", None) or args.model
    return {
        "model": model_fingerprint(model_dir),
        "tokenizer": tokenizer_fingerprint(model_dir),
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


def load_model_and_processor(
    model_dir: str, device: str | None, dtype: str, attn_implementation: str = "sdpa"
):
    """MLLMModel (eval mode, on device) and MLLMProcessor from a model directory.

    A LoRA checkpoint directory (adapter_config.json) works too: its base model (recorded by peft when it was
    trained) is loaded and the adapter merged in memory, with the processor files saved beside the adapter."""
    import json
    from pathlib import Path

    import torch

    from mllm.model.modeling import MLLMModel
    from mllm.processing.processor import MLLMProcessor

    processor = MLLMProcessor.from_pretrained(model_dir)  # checks the tokenizer before the weights load
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    adapter_config = Path(model_dir) / "adapter_config.json"
    base_dir = model_dir
    if adapter_config.is_file():
        base_dir = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_dir or not (Path(base_dir) / "config.json").is_file():
            raise ValueError(
                f"{model_dir} is a LoRA checkpoint whose base model ({base_dir!r}) is not a model directory here: "
                f"merge it first with `mllm merge-lora BASE {model_dir} OUT`"
            )
    model = MLLMModel.from_pretrained(
        base_dir, torch_dtype=torch_dtype, device=device, attn_implementation=attn_implementation
    )
    if adapter_config.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    model.eval()
    return model, processor
