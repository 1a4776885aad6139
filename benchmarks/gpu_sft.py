"""LoRA SFT throughput (tokens/s): our decoder next to transformers' Qwen2ForCausalLM, both with peft LoRA.

Usage (one GPU; about 3 minutes):
    python benchmarks/gpu_sft.py --out gpu_sft.json
    python benchmarks/gpu_sft.py --tiny              # CPU smoke test in seconds (what CI runs)

Both models have the Qwen2-7B shape of MiniCPM-V 2.6's language model (7.6B parameters), built on the meta device and
filled with random bf16 weights on the GPU (nothing downloaded). LoRA r 64 (alpha 64, no dropout) on every linear
layer (q, k, v, o, gate, up, down), adapters kept in float32 (peft's default) under bf16 autocast, AdamW on the
adapters only, batch 4 x 1024 tokens with the loss on every token. The step is forward + backward + optimizer step;
tokens/s = timed steps x batch x length / seconds, after warm-up steps (which also absorb compilation).

"ours" is `mllm.model.llm.LLMForCausalLM` (what `mllm train sft --use-lora` trains) with each decoder layer compiled
by `torch.compile` on CUDA (`--no-compile` to turn that off); "transformers + peft" is Qwen2ForCausalLM as shipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPE_7B = dict(
    vocab_size=151666,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
SHAPE_TINY = dict(
    SHAPE_7B,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_ours(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from mllm.model.config import MLLMConfig
    from mllm.model.llm import LLMForCausalLM
    from mllm.model.loading import fill_random_, reset_buffers

    with torch.device("meta"):
        model = LLMForCausalLM(MLLMConfig(**shape, attn_implementation="sdpa"))
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed=0)
    reset_buffers(model, device)
    return model


def build_transformers(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mllm.model.loading import fill_random_

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed=0)
    rotary = (
        model.model.rotary_emb
    )  # its inv_freq buffers are not persistent: rebuild them (fp32) on the device
    model.model.rotary_emb = type(rotary)(rotary.config).to(device)
    return model


def with_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer in place (same code per layer, so one compiled graph serves all)."""
    from mllm.model.llm import DecoderLayer

    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    from mllm.model.llm import DecoderLayer

    for layer in model.modules():
        if isinstance(layer, DecoderLayer):
            layer._compiled_call_impl = None


def train_steps(
    model: torch.nn.Module, batch: torch.Tensor, steps: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Seconds for `steps` optimizer steps of next-token loss on `batch` [B, T]."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {loss.item()}: the benchmark's random model diverged")
    return time.perf_counter() - start


def measure(
    name: str,
    build: Callable[[], torch.nn.Module],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    model = with_lora(build(), args.lora_r)
    compiled = 0
    if name == "ours" and args.compile:
        compiled = compile_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 500, (args.batch_size, args.seq_len), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        warm_s = train_steps(model, batch, args.warmup_steps, device, dtype)
    except Exception as exc:  # noqa: BLE001 - a compiler failure: report it and measure the eager layers
        if not compiled:
            raise
        logging.warning("torch.compile of the decoder layers failed (%s); measuring them eagerly", exc)
        uncompile_layers(model)
        compiled = 0
        warm_s = train_steps(model, batch, args.warmup_steps, device, dtype)
    seconds = train_steps(model, batch, args.steps, device, dtype)
    tokens = args.steps * args.batch_size * args.seq_len
    result = {
        "path": name,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / args.steps,
        "warmup_s": warm_s,
        "trainable_params": trainable,
        "compiled_layers": compiled,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    logging.info("%s", result)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model on CPU: a smoke test in seconds"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="ours without torch.compile"
    )
    parser.add_argument("--out", default="gpu_sft.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.steps, args.warmup_steps = min(args.seq_len, 64), min(args.steps, 2), 1
        args.lora_r = min(args.lora_r, 8)
    for name in ("batch_size", "seq_len", "lora_r", "steps", "warmup_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type != "cuda":
        args.compile = False  # CPU: the eager model (compiling needs a C++ toolchain and minutes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    rows = [
        measure("ours", lambda: build_ours(shape, device, dtype), args, device, dtype),
        measure("transformers + peft", lambda: build_transformers(shape, device, dtype), args, device, dtype),
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\n## LoRA SFT on {device_name}: r {args.lora_r}, batch {args.batch_size} x {args.seq_len}, {dtype}\n"
    )
    print("| path | tokens/s | s / step | peak GiB |")
    print("|---|---:|---:|---:|")
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"| {r['path']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {peak} |")
    result = {
        "device": device_name,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "args": vars(args),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
