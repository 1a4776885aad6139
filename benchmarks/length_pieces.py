"""A training step on a whole padded batch against the same step in pieces of similar length (`--length-pieces`),
side by side.

    OMP_NUM_THREADS=1 python benchmarks/length_pieces.py MODEL_DIR DATA_JSON --out result.json \\
        [--batch 32] [--pieces 1 2 4] [--steps 16]

MODEL_DIR is a trained demo model (e.g. `runs/demo/questions/model`), DATA_JSON an SFT file of its world (e.g.
`runs/demo/sft_data/questions.json`; 3,000 items drawn at random from it, as the demo's batches mix the file's
kinds of item). `--batch` is what one training process holds (the demo's `questions` stage: 64 over 2 processes,
32; its mixed SFT: 16). Forward and backward with the frozen tower as the demo trains (eager attention, the
per-sample loss, bfloat16 autocast where the CPU has a bfloat16 path), one thread; each batch is stepped once per
piece count, the order rotating from batch to batch. Every piece count's loss must equal the whole batch's to 1e-6
(relative), or the run fails. Writes the mean step times, the real and padded tokens computed per step, and every
measurement.
"""

from __future__ import annotations

import json
import time

import torch
from vision_cache import benchmark_parser, demo_batches, run_fields


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pieces", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    if 1 not in args.pieces:
        parser.error("--pieces must include 1 (the whole batch, the baseline)")

    from mllm.data.sft import split_by_length
    from mllm.demo.config import native_bf16
    from mllm.model.modeling import MLLMModel
    from mllm.train.sft import loss_sums_by_length

    torch.set_num_threads(1)
    batches = demo_batches(args.model_dir, args.data, args.items, args.steps, args.batch, spread=True)
    model = MLLMModel.from_pretrained(args.model_dir, attn_implementation="eager").train()
    model.vpm.requires_grad_(False)
    bf16 = native_bf16("cpu")

    def step(batch, pieces: int) -> tuple[float, float, int]:
        """(seconds, loss, padded tokens computed) of one forward and backward by SFTTrainer's own
        `loss_sums_by_length` (the per-sample loss)."""
        padded = sum(piece["input_ids"].numel() for piece in split_by_length(batch, pieces))  # not timed
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            total, count = loss_sums_by_length(model, batch, pieces, per_sample=True)
        loss = total / count
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item(), padded

    for batch in batches[:2]:  # kernels warm
        step(batch, 1)
    times: dict[int, list[float]] = {p: [] for p in args.pieces}
    tokens: dict[int, list[int]] = {p: [] for p in args.pieces}
    for i, batch in enumerate(batches):
        order = args.pieces[i % len(args.pieces) :] + args.pieces[: i % len(args.pieces)]
        losses = {}
        for pieces in order:
            seconds, losses[pieces], padded = step(batch, pieces)
            times[pieces].append(seconds)
            tokens[pieces].append(padded)
        for pieces, loss in losses.items():
            if abs(loss - losses[1]) > 1e-6 * abs(losses[1]):
                raise SystemExit(f"batch {i}: loss {loss!r} in {pieces} pieces, {losses[1]!r} whole")
    mean = {p: sum(v) / len(v) for p, v in times.items()}
    result = {
        **run_fields("length_pieces", args, args.batch, bf16),
        "real_tokens_per_step": sum(int(b["attention_mask"].sum()) for b in batches) / len(batches),
        "padded_tokens_per_step": {p: sum(v) / len(v) for p, v in tokens.items()},
        "s_per_step": mean,
        "speedup": {p: mean[1] / mean[p] for p in args.pieces},
        "losses_equal_to_1e-6": True,
        "times": times,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(", ".join(f"{p} pieces {mean[p]:.3f} s ({mean[1] / mean[p]:.2f}x)" for p in args.pieces))


if __name__ == "__main__":
    main()
