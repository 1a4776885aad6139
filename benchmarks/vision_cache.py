"""A training step with the frozen vision tower run against one with its outputs from the vision cache, side by side.

    OMP_NUM_THREADS=1 python benchmarks/vision_cache.py MODEL_DIR DATA_JSON --out result.json [--steps 16]

MODEL_DIR is a trained demo model (e.g. `runs/demo/questions/model`), DATA_JSON an SFT file of its world (e.g.
`runs/demo/sft_data/questions.json`; the first 3,000 items are read). Forward and backward of random batches of 32
(bfloat16 autocast where the CPU has a bfloat16 path, eager attention: the demo's training settings), one thread;
every batch's images are cached first, then each batch is stepped once each way, alternating which goes first. The
two losses of a batch must be equal to the bit, or the run fails. Writes the mean step times and every measurement,
and how far the tower's rows of the first k slices of a batch, run alone, are from the same rows run with 16.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

import torch


def demo_batches(
    model_dir: Path, data: Path, items: int, steps: int, batch_size: int, spread: bool = False
) -> list[dict]:
    """`steps` random batches of `batch_size` from the first `items` items of an SFT file (`spread`: from `items`
    drawn at random from the whole file, whose kinds of item come in blocks), as `data_collator` makes them for
    training (seeded: the same batches on every run)."""
    from mllm.data.sft import SupervisedDataset, data_collator
    from mllm.processing.processor import MLLMProcessor

    processor = MLLMProcessor.from_pretrained(model_dir)
    every = json.loads(data.read_text(encoding="utf-8"))
    chosen = random.Random(0).sample(every, min(items, len(every))) if spread else every[:items]
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "items.json"
        subset.write_text(json.dumps(chosen), encoding="utf-8")
        dataset = SupervisedDataset(str(subset), processor, image_folder=data.parent, max_length=512)
        rng = random.Random(0)
        return [
            data_collator(
                [dataset[i] for i in rng.sample(range(len(dataset)), batch_size)],
                pad_token_id=processor.pad_token_id,
            )
            for _ in range(steps)
        ]


def run_fields(name: str, args: argparse.Namespace, batch: int, bf16: bool) -> dict:
    """What a result file records of the run: the benchmark, date, machine, torch, model, data and settings."""
    return {
        "benchmark": name,
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "model_dir": str(args.model_dir),
        "data": str(args.data),
        "batch": batch,
        "threads": 1,
        "bf16_autocast": bf16,
        "steps": args.steps,
    }


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the demo-batch benchmarks: MODEL_DIR, DATA_JSON, --out, --steps, --items."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--items", type=int, default=3000)
    return parser


def main() -> None:
    args = benchmark_parser(__doc__).parse_args()

    from mllm.demo.config import native_bf16
    from mllm.model.modeling import MLLMModel
    from mllm.train.losses import sft_loss_per_sample

    torch.set_num_threads(1)
    batches = demo_batches(args.model_dir, args.data, args.items, args.steps, 32)
    model = MLLMModel.from_pretrained(args.model_dir, attn_implementation="eager").train()
    model.vpm.requires_grad_(False)
    cache = model.attach_vision_cache(2**30)
    bf16 = native_bf16("cpu")

    def step(batch) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model({k: v for k, v in batch.items() if k != "labels"}).logits
            loss = sft_loss_per_sample(logits, batch["labels"])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start, loss.item()

    for batch in batches:  # every batch's slices into the cache (and the kernels warm)
        step(batch)
    times: dict[str, list[float]] = {"tower": [], "cache": []}
    for i, batch in enumerate(batches):
        losses = {}
        for kind in ("tower", "cache") if i % 2 == 0 else ("cache", "tower"):
            model.vision_cache = cache if kind == "cache" else None
            seconds, losses[kind] = step(batch)
            times[kind].append(seconds)
        if losses["tower"] != losses["cache"]:
            raise SystemExit(
                f"batch {i}: loss {losses['tower']!r} with the tower, {losses['cache']!r} from the cache"
            )
    mean = {kind: sum(values) / len(values) for kind, values in times.items()}
    # what a step that caches some slices changes: the tower on k slices alone against the same slices in one batch
    strips = [strip for sample in batches[0]["pixel_values"] for strip in sample][:16]
    sizes = torch.cat([torch.as_tensor(t).reshape(-1, 2) for t in batches[0]["tgt_sizes"]])[:16]
    differences = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # grad mode on, as in training
        together = model.vpm.encode_strips(strips, sizes, "eager", 16)  # [16, L, D]
        for k in range(1, 17):
            alone = model.vpm.encode_strips(strips[:k], sizes[:k], "eager", 16)
            differences[k] = (alone - together[:k]).abs().max().item()
    result = {
        **run_fields("vision_cache", args, 32, bf16),
        "s_per_step": mean,
        "speedup": mean["tower"] / mean["cache"],
        "losses_equal": True,
        "tower_rows_k_alone_vs_16_together_max_abs_diff": differences,
        "times": times,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"tower {mean['tower']:.3f} s, cache {mean['cache']:.3f} s per step: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
