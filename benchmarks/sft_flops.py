"""The matrix FLOPs of the demo's SFT steps, and the seconds they need at this CPU's best float32 GEMM rate.

    OMP_NUM_THREADS=1 python benchmarks/sft_flops.py MODEL_DIR DATA_JSON --out result.json \\
        [--batch 32] [--pieces 2] [--steps 16]

MODEL_DIR is a demo model (e.g. `runs/demo/questions/model`), DATA_JSON an SFT file of its world (e.g.
`runs/demo/sft_data/questions.json`; 3,000 items drawn at random from it). `--batch` is what one training process
holds (the demo's `questions` stage: 64 over 2 processes, 32; its mixed SFT: 16), `--pieces` the demo's
`length_pieces`. PyTorch's own `FlopCounterMode` counts the matrix products (mm, addmm, bmm, convolutions) of one
forward and backward per batch as `SFTTrainer` computes them (eager attention, the per-sample loss, float32, the
tower frozen); the frozen tower's share is reported apart, since the demo caches its rows. Then one thread times
float32 products of the LLM MLP's shape and a square one (best of several): FLOPs over the best rate is the least
time a step's products take on this CPU, whatever else is made faster. Writes the counts, the rates and the floor.
"""

from __future__ import annotations

import json
import timeit

import torch
from torch.utils.flop_counter import FlopCounterMode
from vision_cache import benchmark_parser, demo_batches, run_fields


def gemm_rate(m: int, k: int, n: int, repeats: int = 20) -> float:
    """Best GFLOP/s of a float32 [m, k] @ [k, n] product over `repeats` timings (after a warm-up)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best = min(timeit.repeat(lambda: torch.mm(a, b), number=1, repeat=repeats))
    return 2 * m * k * n / best / 1e9


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pieces", type=int, default=2)
    args = parser.parse_args()

    from mllm.data.sft import split_by_length
    from mllm.model.modeling import MLLMModel
    from mllm.train.sft import loss_sums_by_length

    torch.set_num_threads(1)
    batches = demo_batches(args.model_dir, args.data, args.items, args.steps, args.batch, spread=True)
    model = MLLMModel.from_pretrained(args.model_dir, attn_implementation="eager").train()
    model.vpm.requires_grad_(False)
    tower = f"{type(model).__name__}.vpm"
    total = in_tower = 0
    for batch in batches:
        counter = FlopCounterMode(display=False)
        with counter:
            loss_sum, count = loss_sums_by_length(model, batch, args.pieces, per_sample=True)
            (loss_sum / count).backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
        in_tower += sum(counter.get_flop_counts().get(tower, {}).values())
    steps = len(batches)
    padded = (
        sum(piece["input_ids"].numel() for b in batches for piece in split_by_length(b, args.pieces)) / steps
    )
    tokens = round(padded / args.pieces)  # rows of one piece's products
    hidden, mlp = model.config.hidden_size, model.config.intermediate_size
    rates = {
        f"mlp [{tokens}, {hidden}] @ [{hidden}, {mlp}]": gemm_rate(tokens, hidden, mlp),
        "square 1024": gemm_rate(1024, 1024, 1024),
    }
    without_tower = (total - in_tower) / steps / 1e9
    result = {
        **run_fields("sft_flops", args, args.batch, False),
        "pieces": args.pieces,
        "real_tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches) / steps,
        "padded_tokens_per_step": padded,
        "gflop_per_step": total / steps / 1e9,
        "gflop_per_step_tower": in_tower / steps / 1e9,
        "gflop_per_step_without_tower": without_tower,
        "gemm_gflops_one_thread": rates,
        "s_per_step_at_best_rate_without_tower": without_tower / max(rates.values()),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(
        f"{without_tower:.1f} GFLOP per step without the tower ({in_tower / steps / 1e9:.1f} in it); best GEMM "
        f"{max(rates.values()):.1f} GFLOP/s: {result['s_per_step_at_best_rate_without_tower']:.3f} s per step"
    )


if __name__ == "__main__":
    main()
