"""Decode speed: our two engines against transformers' Qwen2 (static cache + compile, and dynamic cache), same weights.

Usage (one GPU):
    python benchmarks/gpu_generate.py --out gpu_generate.json          # the targets: estimated 5 min on an H200
    python benchmarks/gpu_generate.py --grid full --out g_full.json    # every row: estimated 8 min
    python benchmarks/gpu_generate.py --tiny --grid full --out g.json  # CPU smoke test in ~15 s (what CI runs)

The estimates are not measurements (no GPU was lent since this was written): ~30 s per compiled path at 8B (the
issue's figure for transformers' static cache), three compiled paths, a minute of small compiles for the check.

The model is MiniCPM-V 2.6-shaped (Qwen2-7B decoder + SigLIP-400M tower + resampler, 8.1B parameters), built in code
on the meta device and filled with random bf16 weights on the GPU: nothing is downloaded. The tokenizer is the toy
byte-level BPE built in code (same special tokens and chat template as the real one, a small vocabulary).

Paths, all on the same weights (transformers' model shares our decoder's tensors), prompts and token counts:
- "ours --fast-generate": `MLLMModel.generate(fast=True)`, the exact code of `mllm answer --fast-generate` (our
  static KV cache, decode step compiled with CUDA graphs);
- "ours --static-cache": `MLLMModel.generate(cache_implementation="static")`, `mllm answer --static-cache`:
  transformers' own generation loop and static cache driving our decoder (transformers compiles the forward of
  greedy decoding; its beam search runs uncompiled, transformers 5.x);
- "transformers static": transformers' Qwen2ForCausalLM, `generate(cache_implementation="static")` (compiled by
  transformers as above: the library's strongest setting, what a user would pick);
- "transformers dynamic": the same model with its default dynamic cache.
The repetition penalty of the beam preset is applied by the same processor everywhere (`penalty_over_new_tokens`).

Stages, in this order (the JSON is rewritten after every row, so a run cut short keeps what finished):
1. token check: a short fp32 run (decoder of the 7B width with 2 layers; the tiny model on CPU), batch 2, greedy and
   beam 3: every path's tokens against the dynamic cache's, compiled as when timed. This also makes the compiled
   graphs shape-dynamic (torch's automatic dynamic shapes) before the timed rows, for every path alike, so each
   compiled path compiles once for all batch sizes (~30 s each at 8B).
2. ms per decode step of text-only prompts of --prompt-len tokens: the targets, batch 1 greedy and batch 16 beam 3
   (`--grid full` then adds batch 16 greedy, batch 1 beam 3, batch 64 greedy and beam 3, after the job). A step =
   (time for N new tokens -
   time for 1) / (N - 1), each the fastest of --repeats calls after a warm-up, so prefill and compilation are
   excluded. The terminator is the last vocabulary id, which the random model (practically) never picks.
3. the answer job for each --job-engines (default: ours --fast-generate; `--grid full`: both engines) with
   --job-items synthetic 640x480 images through `generate_answers` and
   `model_answer_fn` (what `mllm answer --strategy beam` runs after loading: bucketing, slicing, vision, beam 3,
   writing), ~170 new tokens each; a warm-up batch first (its time, with any compilation, reported apart).
   `benchmarks/gpu_answer_job.py` runs the same job through the `mllm answer` command on a saved model.

The decision rule for item 3 of issue 27 ("one decode engine"): if "ours --static-cache" is within 10% of
"ours --fast-generate" on the job and at batch 1 and 16 (every measured strategy), retire `mllm/model/fast_generate.py`;
otherwise keep it, with the measured reason in its docstring.
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

import torch

from mllm.bench import (
    ResultFile,
    add_run_flags,
    check_at_least_one,
    model_preset,
    qwen2_twin,
    random_mllm,
    start_run,
    synchronize,
    toy_processor,
    write_job,
)
from mllm.model.presets import preset_fields

CHECK_OVERRIDES = dict(num_hidden_layers=2, vision_config=preset_fields("bench-tiny")["vision_config"])
"""The fp32 token check on a GPU: MiniCPM-V 2.6 (Qwen2-7B's width) with two layers and the tiny tower."""
PATHS = {
    "fast": "ours --fast-generate",
    "static": "ours --static-cache",
    "hf-static": "transformers static",
    "hf-dynamic": "transformers dynamic",
}
REFERENCE = "hf-dynamic"
CONFIGS = [(1, "greedy"), (16, "beam"), (16, "greedy"), (1, "beam"), (64, "greedy"), (64, "beam")]
"""(batch, strategy) in the order they are measured: the two targets first."""
RECOMPILE_LIMIT = 32
"""torch's default (8 compiled versions per function) could be reached by a grid of shapes, after which a path would
silently decode eagerly; every path gets the same raised limit."""


class Engines:
    """The four decode paths as functions (ids [B, T], mask [B, T], strategy, n) -> new tokens [B, <= n]."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.twin = qwen2_twin(model.llm)
        self.tokenizer = tokenizer
        self.never = model.config.vocab_size - 1  # terminator: a random model picks it ~1/vocab of the time

    def compiled(self, path: str, strategy: str) -> bool:
        """Whether the path's decode step ran compiled: ours when its step compiled (CUDA) without falling back;
        transformers' static cache on CUDA for greedy/sampling only (its beam search never compiles, 5.x)."""
        if path == "fast":
            return self.model.fast_generator().step.compiled is not None
        on_cuda = self.model.llm.lm_head.weight.device.type == "cuda"
        return path in ("static", "hf-static") and on_cuda and strategy != "beam"

    def kwargs(self, strategy: str, new_tokens: int) -> dict:
        from mllm.model.chat import decoding_kwargs

        return decoding_kwargs(strategy, max_new_tokens=new_tokens, eos_token_id=[self.never])

    def run(self, path: str, ids: torch.Tensor, mask: torch.Tensor, strategy: str, n: int) -> torch.Tensor:
        kwargs = self.kwargs(strategy, n)
        if path in ("fast", "static"):
            engine = {"fast": True} if path == "fast" else {"cache_implementation": "static"}
            return self.model.generate(
                input_ids=ids, attention_mask=mask, tokenizer=self.tokenizer, **engine, **kwargs
            )
        from mllm.model.modeling import penalty_over_new_tokens

        kwargs = penalty_over_new_tokens(kwargs)
        pad = self.tokenizer.pad_token_id
        if path == "hf-static":
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation-config notices, per call
            embeds = self.twin.get_input_embeddings()(ids)
            return self.twin.generate(inputs_embeds=embeds, attention_mask=mask, pad_token_id=pad, **kwargs)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def decode_ms(
    run: Callable[[int], torch.Tensor], new_tokens: int, device: torch.device, repeats: int
) -> dict:
    """ms per decode step from the fastest of `repeats` full-length and one-token calls, each after a warm-up call
    (which absorbs compilation; the minimum is the least disturbed by other work on the machine)."""
    first_s, tokens = timed(lambda: run(new_tokens), device)
    run(1)
    seconds_1 = min(timed(lambda: run(1), device)[0] for _ in range(repeats))
    seconds_n, made = min(
        (s, out.shape[1]) for s, out in (timed(lambda: run(new_tokens), device) for _ in range(repeats))
    )
    step = (seconds_n - seconds_1) / max(made - 1, 1)
    return {
        "ms_per_step": 1000 * step,
        "prefill_ms": 1000 * seconds_1,
        "first_call_s": first_s,
        "new_tokens": int(made),
        "tokens": tokens,
    }


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean length of the common prefix of each row, as a share of the row (1.0: the same tokens)."""
    width = min(a.shape[1], b.shape[1])
    if width == 0:
        return float(a.shape[1] == b.shape[1])
    same = (a[:, :width] == b[:, :width]).long().cumprod(-1).sum(-1).float()
    return float((same / width).mean())


def prompts(batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 500, (batch, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def token_check(args, device: torch.device, tokenizer, results: ResultFile) -> None:
    """fp32: every path's tokens against the dynamic cache's, greedy and beam 3, batch 2."""
    on_cpu = device.type == "cpu"
    check = random_mllm(
        model_preset(on_cpu), device, torch.float32, seed=1, **({} if on_cpu else CHECK_OVERRIDES)
    )
    engines = Engines(check, tokenizer)
    ids, mask = prompts(2, args.check_prompt_len, device)
    for strategy in ("greedy", "beam"):
        reference = engines.run(REFERENCE, ids, mask, strategy, args.check_new_tokens)
        for path in (p for p in args.paths if p != REFERENCE):
            start = time.perf_counter()
            tokens = engines.run(path, ids, mask, strategy, args.check_new_tokens)
            row = {
                "path": PATHS[path],
                "strategy": strategy,
                "same_tokens": bool(torch.equal(tokens, reference)),
                "agreement": agreement(tokens, reference),
                "seconds": time.perf_counter() - start,
            }
            results.append("token_check", row)
            logging.info("token check %s", row)
    del engines


def decode_rows(engines: Engines, args, device: torch.device, results: ResultFile, configs) -> None:
    for batch, strategy in configs:
        ids, mask = prompts(batch, args.prompt_len, device)
        outputs = {}
        for path in sorted(args.paths, key=lambda p: p != REFERENCE):  # the reference first

            def run(n, path=path, ids=ids, mask=mask, strategy=strategy):
                return engines.run(path, ids, mask, strategy, n)

            start = time.perf_counter()
            row = decode_ms(run, args.new_tokens, device, args.repeats)
            outputs[path] = row.pop("tokens")
            row.update(path=PATHS[path], batch=batch, strategy=strategy, wall_s=time.perf_counter() - start)
            row["tokens_per_s"] = 1000 * batch / row["ms_per_step"] if row["ms_per_step"] > 0 else None
            if REFERENCE in outputs:
                row["agreement_vs_dynamic"] = agreement(outputs[path], outputs[REFERENCE])
            row["compiled"] = engines.compiled(path, strategy)
            results.append("decode", row)
            logging.info("%s", row)


def answer_job(model, processor, args, workdir: Path, engine: str) -> dict:
    """Warm-up batch, then the timed job, both through `generate_answers` as `mllm answer` calls it."""
    from mllm.eval.answer import generate_answers, model_answer_fn, parse_question
    from mllm.model.chat import decoding_kwargs

    kwargs = decoding_kwargs("beam", max_new_tokens=args.job_new_tokens)
    kwargs.update({"fast": True} if engine == "fast" else {"cache_implementation": "static"})
    answer_fn = model_answer_fn(model, processor, kwargs)
    questions = workdir / f"questions_{args.job_items}.jsonl"
    if not questions.exists():
        write_job(workdir, args.job_items)
    lines = questions.read_text().splitlines(True)
    warm = workdir / f"warm_{engine}.jsonl"
    warm.write_text("".join(lines[: args.job_batch_size]))
    device = next(model.parameters()).device

    def job(path: Path, out: Path) -> tuple[float, object]:
        synchronize(device)
        start = time.perf_counter()
        summary = generate_answers(
            path, out, answer_fn, "bench", args.job_batch_size, length_fn=answer_fn.prompt_length
        )
        synchronize(device)
        return time.perf_counter() - start, summary

    warm_s, _ = job(warm, workdir / f"warm_answers_{engine}.jsonl")
    job_s, summary = job(questions, workdir / f"answers_{engine}.jsonl")
    return {
        "engine": PATHS[engine],
        "items": summary.succeeded,
        "failed": summary.failed,
        "batch_size": args.job_batch_size,
        "num_beams": kwargs["num_beams"],
        "max_new_tokens": args.job_new_tokens,
        "new_tokens": summary.new_tokens,
        "prompt_tokens": answer_fn.prompt_length(parse_question(json.loads(lines[0]), 0, workdir)),
        "warmup_s": warm_s,
        "job_s": job_s,
        "items_per_s": summary.succeeded / job_s,
    }


def print_tables(result: dict) -> None:
    print(f"\n## token check (fp32): same tokens as the dynamic cache on {result['device']}\n")
    print("| path | strategy | same tokens | agreement |")
    print("|---|---|---|---:|")
    for r in result.get("token_check", []):
        print(
            f"| {r['path']} | {r['strategy']} | {'yes' if r['same_tokens'] else 'no'} | {r['agreement']:.0%} |"
        )
    print(
        f"\n## decode speed on {result['device']} ({result['dtype']}, prompt {result['prompt_len']} tokens)\n"
    )
    print(
        "| path | batch | strategy | compiled | ms / decode step | tokens/s | prefill ms | first call s | "
        "same tokens as dynamic |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in result.get("decode", []):
        same = f"{r['agreement_vs_dynamic']:.0%}" if "agreement_vs_dynamic" in r else ""
        rate = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(
            f"| {r['path']} | {r['batch']} | {r['strategy']} | {'yes' if r['compiled'] else 'no'} | "
            f"{r['ms_per_step']:.2f} | {rate} | "
            f"{r['prefill_ms']:.1f} | {r['first_call_s']:.1f} | {same} |"
        )
    for job in result.get("job", []):
        print(
            f"\n## answer job, {job['engine']}: {job['items']} images 640x480, beam {job['num_beams']}, batch "
            f"{job['batch_size']}\n\n{job['job_s']:.1f} s ({job['items_per_s']:.1f} images/s, {job['new_tokens']} "
            f"new tokens, prompt {job['prompt_tokens']} tokens), warm-up batch {job['warmup_s']:.1f} s"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser, "gpu_generate.json")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--prompt-len", type=int, default=400)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--grid", choices=["targets", "full"], default="targets", help="see the docstring")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls per measurement (the fastest counts)"
    )
    parser.add_argument("--check-prompt-len", type=int, default=32)
    parser.add_argument("--check-new-tokens", type=int, default=16)
    parser.add_argument("--skip-check", action="store_true", help="no fp32 token check")
    parser.add_argument(
        "--job-engines",
        nargs="*",
        default=None,
        choices=["fast", "static"],
        help="default: fast (full: both)",
    )
    parser.add_argument("--job-items", type=int, default=300)
    parser.add_argument("--job-new-tokens", type=int, default=170)
    parser.add_argument("--job-batch-size", type=int, default=50)
    args = parser.parse_args(argv)
    if REFERENCE not in args.paths:
        raise ValueError(f"--paths must include {REFERENCE} (the reference of the token agreement)")
    if args.job_engines is None:
        args.job_engines = ["fast", "static"] if args.grid == "full" else ["fast"]
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 24), min(args.new_tokens, 6)
        args.check_prompt_len, args.check_new_tokens = (
            min(args.check_prompt_len, 12),
            min(args.check_new_tokens, 6),
        )
        args.job_items, args.job_new_tokens = min(args.job_items, 4), min(args.job_new_tokens, 4)
        args.job_batch_size = min(args.job_batch_size, 2)
        args.repeats = max(args.repeats, 3)  # a loaded CPU: the fastest of three
    names = ("prompt_len", "job_items", "job_new_tokens", "job_batch_size", "repeats", "check_prompt_len")
    check_at_least_one(args, names)
    if min(args.new_tokens, args.check_new_tokens) < 2:
        raise ValueError(
            "--new-tokens and --check-new-tokens must be at least 2 (a step is N tokens minus 1)"
        )
    return args


def configs_for(args) -> list[tuple[int, str]]:
    """The measured (batch, strategy) pairs in priority order."""
    return CONFIGS if args.grid == "full" else CONFIGS[:2]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device, results = start_run("gpu_generate", args, argv)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if hasattr(torch._dynamo.config, "recompile_limit"):  # torch >= 2.7; cache_size_limit before
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    else:
        torch._dynamo.config.cache_size_limit = RECOMPILE_LIMIT
    results.payload.update(dtype=str(dtype), prompt_len=args.prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        processor = toy_processor(Path(tmp), small_images=args.tiny)
        if not args.skip_check:
            token_check(args, device, processor.tokenizer, results)
        start = time.perf_counter()
        model = random_mllm(model_preset(args.tiny), device, dtype)
        results.set("parameters", sum(p.numel() for p in model.parameters()))
        results.set("build_s", time.perf_counter() - start)
        engines = Engines(model, processor.tokenizer)
        configs = configs_for(args)
        decode_rows(engines, args, device, results, configs[:2])  # the targets
        for engine in args.job_engines:
            results.append("job", answer_job(model, processor, args, Path(tmp), engine))
        decode_rows(engines, args, device, results, configs[2:])
    result = results.finish()
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
