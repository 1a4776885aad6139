"""Decode speed of our static-cache path next to transformers' `generate`, and an objhal_bench-size answer job.

Usage (one GPU; about 5-8 minutes with compilation):
    python benchmarks/gpu_generate.py --out gpu_generate.json
    python benchmarks/gpu_generate.py --tiny            # CPU smoke test in seconds (what CI runs)

The model is MiniCPM-V 2.6-shaped (Qwen2-7B decoder + SigLIP-400M tower + resampler, 8.1B parameters), built in code
on the meta device and filled with random bf16 weights on the GPU: nothing is downloaded. The tokenizer is the toy
byte-level BPE built in code (same pipeline and special tokens as the real one, a small vocabulary).

1. ms per decode step, text-only prompts of --prompt-len tokens, batch 1 and 16, greedy and beam 3 (repetition
   penalty 1.2): ours (`FastGenerator`: static cache, compiled decode step) next to transformers' `generate` on the
   same model (dynamic cache). A step = (time for N new tokens - time for 1) / (N - 1), so the prefill is excluded.
   The terminator is a token the random model (practically) never picks, so every row runs the full length.
2. The answer job: --job-items synthetic 640x480 images through `mllm.eval.answer.generate_answers` (what
   `mllm answer --fast-generate --strategy beam` runs: prompt building, slicing, vision, beam 3, writing), ~170 new
   tokens each. A warm-up job of one batch runs first (compilation); its time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SHAPE_8B: dict = {}
"""MiniCPM-V 2.6's shape (Qwen2-7B LLM, SigLIP-400M tower, 64 queries) is `MLLMConfig`'s default."""
SHAPE_TINY = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    query_num=64,
    vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2),
)
CORPUS = [
    "The image shows a man sitting on a couch with his dog while a cat sleeps on the chair.",
    "A woman in a red coat is riding a bicycle down a busy city street lined with parked cars.",
    "Describe this image in detail. What objects can you see, and where are they?",
    "On the dining table there are several cups, a bottle of wine and a bowl of oranges.",
]
QUESTION = "Describe this image in detail."


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """MLLMModel of `shape` with random weights: built on meta (no host memory), materialised on `device`."""
    from mllm.model.config import MLLMConfig
    from mllm.model.loading import fill_random_, reset_buffers
    from mllm.model.modeling import MLLMModel

    config = MLLMConfig(**shape, attn_implementation="sdpa")
    with torch.device("meta"):
        model = MLLMModel(config)
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed)
    reset_buffers(model, device)
    return model.eval()


def build_processor(workdir: Path, tiny: bool):
    """The toy BPE tokenizer (built in code) and the real slicing settings (tiny: one 56-px view per image)."""
    from transformers import AutoTokenizer

    from mllm.data.toy_tokenizer import build_toy_tokenizer
    from mllm.processing.image_processing import MLLMImageProcessor
    from mllm.processing.processor import MLLMProcessor

    build_toy_tokenizer(CORPUS * 4, workdir / "tokenizer", vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    image_processor = (
        MLLMImageProcessor(scale_resolution=56, max_slice_nums=1) if tiny else MLLMImageProcessor()
    )
    return MLLMProcessor(tokenizer, image_processor)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, int]:
    """(seconds, new tokens per row) of one call."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, int(out.shape[1])


def decode_ms(
    run: Callable[[int], torch.Tensor], new_tokens: int, device: torch.device, repeats: int
) -> dict:
    """ms per decode step from the fastest of `repeats` full-length and one-token calls, after a warm-up of each
    (the minimum is the least disturbed by other work on the machine)."""
    tokens = run(new_tokens)
    run(1)
    seconds_1 = min(timed(lambda: run(1), device)[0] for _ in range(repeats))
    timings = [timed(lambda: run(new_tokens), device) for _ in range(repeats)]
    seconds_n, made = min(timings)
    step = (seconds_n - seconds_1) / max(made - 1, 1)
    return {"ms_per_step": 1000 * step, "prefill_ms": 1000 * seconds_1, "new_tokens": made, "tokens": tokens}


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean length of the common prefix of each row, as a share of the row: a sanity check of the fast path on the
    GPU (bf16 rounding may let near-ties of a random model diverge late; a broken cache diverges at once)."""
    width = min(a.shape[1], b.shape[1])
    same = (a[:, :width] == b[:, :width]).long().cumprod(-1).sum(-1).float()
    return float((same / width).mean())


def decode_table(model, args, device: torch.device) -> list[dict]:
    """Both paths, batch 1 and 16 (or --batch-sizes), greedy and beam 3."""
    llm = model.llm
    never = llm.config.vocab_size - 1  # the random model's chance of picking it is ~1/vocab per step
    fast = model.fast_generator(compile=False if args.no_compile else None)  # the one the answer job reuses
    rows = []
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 500, (batch, args.prompt_len), generator=g).to(device)
        embeds = llm.get_input_embeddings()(ids)
        mask = torch.ones_like(ids)
        for strategy, kwargs in (
            ("greedy", dict(do_sample=False)),
            ("beam3", dict(num_beams=3, repetition_penalty=1.2)),
        ):
            common = dict(pad_token_id=0, eos_token_id=[never], **kwargs)

            def ours(n, common=common, embeds=embeds, mask=mask):
                return fast.generate(embeds, mask, max_new_tokens=n, **common)

            def plain(n, common=common, embeds=embeds, mask=mask):
                with torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter(
                        "ignore"
                    )  # the repetition-penalty-with-inputs_embeds notice, per call
                    return llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, **common)

            outputs = {}
            for path, run in (("ours (static cache)", ours), ("transformers generate", plain)):
                start = time.perf_counter()
                result = decode_ms(run, args.new_tokens, device, args.repeats)
                outputs[path] = result.pop("tokens")
                result.update(path=path, batch=batch, strategy=strategy, wall_s=time.perf_counter() - start)
                if path.startswith("ours"):
                    result["compiled"] = fast.step.compiled is not None
                result["tokens_per_s"] = 1000 * batch / result["ms_per_step"]
                rows.append(result)
                logging.info("%s", result)
            rows[-2]["token_agreement"] = agreement(*outputs.values())
    return rows


def write_job(workdir: Path, items: int, seed: int = 0) -> Path:
    """`items` questions on synthetic 640x480 JPEG images (smooth colour fields with noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    lines = []
    for i in range(items):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(a * xx), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = image_dir / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        lines.append(json.dumps({"image": str(path), "question": QUESTION, "image_id": i}))
    questions = workdir / f"questions_{items}.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return questions


def answer_job(model, processor, args, workdir: Path) -> dict:
    """Warm-up job (one batch), then the timed job, both through `generate_answers` with --fast-generate."""
    from mllm.eval.answer import generate_answers, model_answer_fn
    from mllm.model.chat import decoding_kwargs

    kwargs = decoding_kwargs("beam", max_new_tokens=args.job_new_tokens)
    kwargs["fast"] = True
    if args.no_compile:
        kwargs["fast_compile"] = False
    answer_fn = model_answer_fn(model, processor, kwargs)
    questions = write_job(workdir, args.job_items)
    warm_questions = workdir / "warm.jsonl"
    warm_questions.write_text("".join(questions.read_text().splitlines(True)[: args.job_batch_size]))
    device = next(model.parameters()).device
    start = time.perf_counter()
    generate_answers(
        warm_questions,
        workdir / "warm_answers.jsonl",
        answer_fn,
        "bench",
        args.job_batch_size,
        length_fn=answer_fn.prompt_length,
    )
    synchronize(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    summary = generate_answers(
        questions,
        workdir / "answers.jsonl",
        answer_fn,
        "bench",
        args.job_batch_size,
        length_fn=answer_fn.prompt_length,
    )
    synchronize(device)
    job_s = time.perf_counter() - start
    records = [json.loads(line) for line in (workdir / "answers.jsonl").read_text().splitlines()]
    prompt_tokens = answer_fn.prompt_length(next(iter_items(questions)))
    return {
        "items": len(records),
        "distinct_idx": len({r["idx"] for r in records}),
        "batch_size": args.job_batch_size,
        "num_beams": kwargs["num_beams"],
        "max_new_tokens": args.job_new_tokens,
        "new_tokens": summary.new_tokens,
        "prompt_tokens": prompt_tokens,
        "warmup_s": warm_s,
        "job_s": job_s,
        "items_per_s": len(records) / job_s,
    }


def iter_items(questions: Path):
    from mllm.eval.answer import parse_question

    for idx, line in enumerate(questions.read_text().splitlines()):
        yield parse_question(json.loads(line), idx, questions.parent)


def print_table(decode_rows: list[dict], job: dict | None, device_name: str) -> None:
    print(f"\n## decode speed on {device_name}\n")
    print("| path | batch | strategy | ms / decode step | tokens/s | prefill ms | same tokens |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in decode_rows:
        same = f"{r['token_agreement']:.0%}" if "token_agreement" in r else ""
        print(
            f"| {r['path']} | {r['batch']} | {r['strategy']} | {r['ms_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['prefill_ms']:.1f} | {same} |"
        )
    if job is not None:
        print(
            f"\n## answer job ({job['items']} images 640x480, beam {job['num_beams']}, batch {job['batch_size']})\n"
        )
        print(
            f"{job['job_s']:.1f} s end to end ({job['items_per_s']:.1f} images/s, {job['new_tokens']} new tokens, "
            f"prompt {job['prompt_tokens']} tokens), warm-up batch {job['warmup_s']:.1f} s"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model on CPU: a smoke test in seconds"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--prompt-len", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls per measurement (the fastest counts)"
    )
    parser.add_argument("--job-items", type=int, default=300)
    parser.add_argument("--job-new-tokens", type=int, default=170)
    parser.add_argument("--job-batch-size", type=int, default=50)
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="our path without torch.compile")
    parser.add_argument("--out", default="gpu_generate.json", help="JSON results")
    args = parser.parse_args(argv)
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 24), min(args.new_tokens, 6)
        args.job_items, args.job_new_tokens = min(args.job_items, 4), min(args.job_new_tokens, 4)
        args.job_batch_size = min(args.job_batch_size, 2)
        args.batch_sizes = [min(b, 2) for b in args.batch_sizes]
        args.repeats = max(args.repeats, 3)
    for name in ("prompt_len", "new_tokens", "job_items", "job_new_tokens", "job_batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        raise ValueError("--new-tokens must be at least 2 (a step is measured as N tokens minus 1)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    start = time.perf_counter()
    model = build_model(SHAPE_TINY if args.tiny else SHAPE_8B, device, dtype)
    build_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    logging.info("model: %.2fB parameters, %s, built in %.1f s", params / 1e9, dtype, build_s)
    decode_rows = decode_table(model, args, device)
    job = None
    if not args.skip_job:
        with tempfile.TemporaryDirectory() as tmp:
            processor = build_processor(Path(tmp), args.tiny)
            job = answer_job(model, processor, args, Path(tmp))
    print_table(decode_rows, job, device_name)
    result = {
        "device": device_name,
        "dtype": str(dtype),
        "parameters": params,
        "torch": torch.__version__,
        "prompt_len": args.prompt_len,
        "decode": decode_rows,
        "job": job,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
