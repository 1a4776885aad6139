"""The objhal_bench-size answer job through the `mllm answer` command, as a user runs it, in a fresh process.

Usage (one GPU):
    python benchmarks/gpu_answer_job.py --out gpu_answer_job.json   # estimated 4-5 min on an H200 (not yet run there)
    python benchmarks/gpu_answer_job.py --tiny --out j.json         # CPU smoke test in ~30 s

A MiniCPM-V 2.6-shaped model with random bf16 weights (built in code, nothing downloaded) is saved with the toy
tokenizer and MiniCPM-V's slicing settings to a temporary model directory; --job-items synthetic 640x480 JPEG images
with "Describe this image in detail." make the question file. Then, per --engines, a fresh
`python -m mllm answer MODEL --questions Q --out A --strategy beam --batch-size 50 --max-new-tokens 170 [--fast-generate
| --static-cache]` runs. Reported: the command's own answering time (its summary line: the answer loop, from the first
batch's image decoding to the last answer written, any compilation included), the process wall time, and their
difference (interpreter start, imports, model and processor load: "load excluded" in the target means this part).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mllm.bench import (
    add_run_flags,
    check_at_least_one,
    model_preset,
    random_mllm,
    start_run,
    toy_processor,
    write_job,
)

ENGINES = {"fast": "--fast-generate", "static": "--static-cache", "default": None}
SUMMARY = re.compile(
    r"answered (\d+), skipped (\d+) \(already done\), failed (\d+); (\d+) new tokens in ([\d.]+)s"
)
"""`AnswerSummary.line()`, the last line `mllm answer` prints."""


def save_model(args, device: torch.device, workdir: Path) -> tuple[Path, float]:
    """The random model and the processor in a model directory; returns it and the seconds the save took."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_mllm(model_preset(args.tiny), device, dtype)
    processor = toy_processor(workdir, small_images=args.tiny, vocab_size=model.config.vocab_size)
    model_dir = workdir / "model"
    start = time.perf_counter()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    seconds = time.perf_counter() - start
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model_dir, seconds


def answer_command(
    args, model_dir: Path, questions: Path, out: Path, engine: str, device: torch.device
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mllm",
        "answer",
        str(model_dir),
        "--questions",
        str(questions),
        "--out",
        str(out),
        "--strategy",
        "beam",
        "--batch-size",
        str(args.batch_size),
        "--max-new-tokens",
        str(args.new_tokens),
        "--device",
        str(device),
    ]
    return command + ([ENGINES[engine]] if ENGINES[engine] else [])


def run_job(command: list[str]) -> dict:
    """Run `mllm answer`; its wall time and the figures of its summary line."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"mllm answer exited {done.returncode}:\n{done.stderr[-4000:]}")
    match = SUMMARY.search(done.stdout)
    if match is None:
        raise RuntimeError(f"mllm answer printed no summary line:\n{done.stdout[-2000:]}")
    answered, skipped, failed, new_tokens, seconds = match.groups()
    answer_s = float(seconds)
    return {
        "answered": int(answered),
        "skipped": int(skipped),
        "failed": int(failed),
        "new_tokens": int(new_tokens),
        "answer_s": answer_s,
        "process_s": wall,
        "startup_and_load_s": wall - answer_s,
        "images_per_s": int(answered) / answer_s if answer_s else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser, "gpu_answer_job.json")
    parser.add_argument("--engines", nargs="+", default=["fast", "static"], choices=list(ENGINES))
    parser.add_argument("--job-items", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=170)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    if args.tiny:
        args.job_items, args.new_tokens, args.batch_size = min(args.job_items, 4), min(args.new_tokens, 4), 2
    check_at_least_one(args, ("job_items", "new_tokens", "batch_size"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device, results = start_run("gpu_answer_job", args, argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, save_s = save_model(args, device, workdir)
        results.set("save_s", save_s)
        questions = write_job(workdir, args.job_items)
        for engine in args.engines:
            command = answer_command(
                args, model_dir, questions, workdir / f"answers_{engine}.jsonl", engine, device
            )
            row = {"engine": engine, "flag": ENGINES[engine], **run_job(command)}
            row["command"] = " ".join(["mllm", *command[3:]]).replace(tmp, "$TMP")
            logging.info("%s", row)
            results.append("jobs", row)
    result = results.finish()
    for row in result["jobs"]:
        # None when the summary's seconds round to 0 (a tiny job on an idle machine): no rate to print
        rate = "-" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"
        print(
            f"mllm answer {row['flag'] or '(default engine)'}: {row['answered']} images in {row['answer_s']:.1f} s "
            f"({rate}/s, {row['new_tokens']} new tokens); process {row['process_s']:.1f} s, of "
            f"which start-up and model load {row['startup_and_load_s']:.1f} s"
        )
    return result


if __name__ == "__main__":
    main()
