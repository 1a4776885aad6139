"""LoRA SFT throughput (tokens/s): what `mllm train sft` runs against transformers + peft, both eager and compiled.

Usage (one GPU):
    python benchmarks/gpu_sft.py --out gpu_sft.json     # estimated 3-4 min on an H200 (not yet run there)
    python benchmarks/gpu_sft.py --tiny --out s.json    # CPU smoke test in ~30 s (what CI runs)

"ours" is what `mllm train sft --use-lora --bf16 [--torch-compile]` runs, minus reading the checkpoint: MLLMModel
(Qwen2-7B decoder + SigLIP-400M tower + resampler, MiniCPM-V 2.6's shape) with `set_trainable` and `apply_lora`,
trained by `SFTTrainer` (our loss) on batches from our `data_collator`. "transformers + peft" is transformers'
Qwen2ForCausalLM with peft LoRA, trained by transformers' `Trainer` with the model's own loss and its default
collator. Both: random bf16 weights built in code (nothing downloaded), LoRA r 64 (alpha 64, no dropout) on q, k, v,
o, gate, up, down of the decoder, adapters in float32 (peft's default) under bf16 autocast, AdamW (Trainer's default)
on the adapters only, batch 4 x 1024 text tokens with the loss on every token, no gradient checkpointing.

Compile settings, the same for both: eager, and Trainer's `--torch-compile` (`torch.compile` of the whole model by
accelerate; inductor on CUDA, `--compile-backend` on CPU, where --tiny uses aot_eager: graph capture without a C++
toolchain). tokens/s = timed steps x batch x length / their seconds, measured by a Trainer callback after
--warmup-steps (which absorb compilation; their time is reported as warmup_s). A compiled row that fails records the
error and the run goes on. The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from functools import partial

import torch
from transformers import TrainerCallback

from mllm.bench import (
    add_run_flags,
    check_at_least_one,
    model_preset,
    random_mllm,
    random_qwen2,
    start_run,
    synchronize,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PATHS = ("ours", "transformers + peft")


class StepClock(TrainerCallback):
    """The (synchronised) time at the start of training and at the end of every optimizer step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: dict[int, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.marks[0] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.marks[state.global_step] = time.perf_counter()


def training_arguments(args, out_dir: str, device: torch.device, compiled: bool, ours: bool):
    """The same Trainer settings for both paths (ours through `mllm train sft`'s argument class)."""
    from transformers import TrainingArguments

    from mllm.train.runner import MLLMTrainingArguments

    cls = MLLMTrainingArguments if ours else TrainingArguments
    return cls(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=args.warmup_steps + args.steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        torch_compile=compiled,
        torch_compile_backend=args.compile_backend if compiled else None,
        seed=0,
        disable_tqdm=True,
    )


def token_batch(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, min(vocab, 500), (args.batch_size, args.seq_len), generator=g)  # [B, T]


def ours_trainer(args, device: torch.device, dtype: torch.dtype, out_dir: str, compiled: bool):
    """`build_sft_trainer`'s pieces on a random model: freeze flags, LoRA, SFTTrainer, our collator."""
    from mllm.data.sft import data_collator
    from mllm.train.sft import ModelArguments, SFTTrainer, apply_lora, set_trainable

    model_args = ModelArguments(
        model="random weights (gpu_sft.py)",
        use_lora=True,
        lora_r=args.lora_r,
        lora_alpha=args.lora_r,
        lora_dropout=0.0,
        tune_resampler=False,
    )
    model = random_mllm(model_preset(args.tiny), device, dtype).train()
    set_trainable(model, model_args)
    model = apply_lora(model, model_args)
    ids = token_batch(args, model.config.vocab_size)
    samples = [
        {
            "input_ids": row,
            "labels": row.clone(),
            "position_ids": torch.arange(len(row)),
            "image_bound": torch.zeros(0, 2, dtype=torch.long),
            "pixel_values": [],
            "tgt_sizes": torch.zeros(0, 2, dtype=torch.int32),
        }
        for row in ids
    ]
    return SFTTrainer(
        model=model,
        args=training_arguments(args, out_dir, device, compiled, ours=True),
        train_dataset=samples * (args.warmup_steps + args.steps),
        data_collator=partial(data_collator, pad_token_id=0),
    )


def transformers_trainer(args, device: torch.device, dtype: torch.dtype, out_dir: str, compiled: bool):
    """Qwen2ForCausalLM + peft LoRA under transformers' Trainer, as its documentation shows."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, default_data_collator

    from mllm.model.config import MLLMConfig

    config = MLLMConfig.from_preset(model_preset(args.tiny))
    model = random_qwen2(config, device, dtype).train()
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none"
    )
    model = get_peft_model(model, lora)
    samples = [{"input_ids": row, "labels": row.clone()} for row in token_batch(args, config.vocab_size)]
    return Trainer(
        model=model,
        args=training_arguments(args, out_dir, device, compiled, ours=False),
        train_dataset=samples * (args.warmup_steps + args.steps),
        data_collator=default_data_collator,
    )


def measure(path: str, compiled: bool, args, device: torch.device, dtype: torch.dtype) -> dict:
    build = ours_trainer if path == "ours" else transformers_trainer
    row = {"path": path, "compiled": compiled}
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        trainer = build(args, device, dtype, out_dir, compiled)
        row["build_s"] = time.perf_counter() - start
        clock = StepClock(device)
        trainer.add_callback(clock)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            output = trainer.train()
        except Exception as exc:  # noqa: BLE001 - a compiled row that fails is reported, the others still run
            if not compiled:
                raise
            logging.warning("%s with --torch-compile failed: %s", path, exc)
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            return row
        finally:
            model = trainer.model
            del trainer
    total = args.warmup_steps + args.steps
    seconds = clock.marks[total] - clock.marks[args.warmup_steps]
    row.update(
        tokens_per_s=args.steps * args.batch_size * args.seq_len / seconds,
        step_s=seconds / args.steps,
        warmup_s=clock.marks[args.warmup_steps] - clock.marks[0],
        loss=float(output.training_loss),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"\n## LoRA SFT on {result['device']}: r {s['lora_r']}, batch {s['batch_size']} x {s['seq_len']}, "
        f"{result['dtype']}\n"
    )
    print(
        "| path | compiled | tokens/s | s / step | warm-up s | peak GiB | trainable | vs transformers + peft |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = result.get("rows", [])
    for r in rows:
        if "error" in r:
            print(
                f"| {r['path']} | {'yes' if r['compiled'] else 'no'} | failed: {r['error'][:80]} | | | | | |"
            )
            continue
        base = next(
            (
                b
                for b in rows
                if b["path"] == PATHS[1] and b["compiled"] == r["compiled"] and "error" not in b
            ),
            None,
        )
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(
            f"| {r['path']} | {'yes' if r['compiled'] else 'no'} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
            f"{r['warmup_s']:.1f} | {peak} | {r['trainable_params']} | {ratio} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_flags(parser, "gpu_sft.json")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["eager", "compiled"],
        choices=["eager", "compiled"],
        help="settings to run",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor; aot_eager with --tiny)",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.steps, args.warmup_steps = min(args.seq_len, 64), min(args.steps, 2), 1
        args.lora_r = min(args.lora_r, 8)
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    check_at_least_one(args, ("batch_size", "seq_len", "lora_r", "steps", "warmup_steps"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device, results = start_run("gpu_sft", args, argv)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results.set("dtype", str(dtype))
    for setting in ("eager", "compiled"):
        if setting in args.compile:
            for path in PATHS:
                row = measure(path, setting == "compiled", args, device, dtype)
                logging.info("%s", row)
                results.append("rows", row)
    result = results.finish()
    print_table(result)
    return result


if __name__ == "__main__":
    main()
