"""SFT training throughput (tokens per second) of a fixture-size model on CPU: eager vs sdpa attention.

    OMP_NUM_THREADS=2 python benchmarks/sft_throughput.py [--model ../shared/fixtures/minicpmv26_tiny] [--steps 20]

Both backends train the same model on the same synthetic yes/no items (56-px images, one slice), side by side in
one run and alternating, so machine noise hits both alike. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared" / "fixtures" / "minicpmv26_tiny"


def small_copy(model_dir: Path, out: Path) -> Path:
    """The checkpoint with a processor for 56-px images (16 patches per image)."""
    from mllm.model.loading import copy_model_dir

    return copy_model_dir(model_dir, out, scale_resolution=56, max_slice_nums=1)


def sft_file(root: Path, n: int) -> Path:
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]
    items = []
    for i in range(n):
        Image.new("RGB", (56, 56), colours[i % 4]).save(root / f"{i}.png")
        question = "Describe the colour of this picture and say whether it is warm. " * 3
        items.append(
            {
                "id": i,
                "image": f"{i}.png",
                "conversations": [
                    {"role": "user", "content": f"<image>\n{question}"},
                    {
                        "role": "assistant",
                        "content": "It is a plain picture with one colour everywhere. " * 4,
                    },
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(items))
    return path


def measure(model_dir: Path, data: Path, attn: str, steps: int, batch: int, out: Path) -> dict:
    from mllm.train.runner import MLLMTrainingArguments
    from mllm.train.sft import DataArguments, ModelArguments, build_sft_trainer

    args = MLLMTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = build_sft_trainer(
        ModelArguments(model=str(model_dir), attn_implementation=attn), DataArguments(data=str(data)), args
    )
    tokens = sum(len(item.input_ids) for item in trainer.train_dataset.items)
    tokens_per_step = tokens / len(trainer.train_dataset) * batch
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "attn": attn,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens_per_step * steps / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("sft_throughput.json"))
    args = parser.parse_args()
    results: dict[str, list[float]] = {"eager": [], "sdpa": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = small_copy(args.model, tmp)
        data = sft_file(tmp, 32)
        for _ in range(args.rounds):
            for attn in ("eager", "sdpa"):
                torch.manual_seed(0)
                results[attn].append(
                    measure(model_dir, data, attn, args.steps, args.batch_size, tmp / attn)["tokens_per_s"]
                )
    best = {attn: max(v) for attn, v in results.items()}
    print("| attention | tokens/s (best of rounds) | all rounds |\n|---|---:|---|")
    for attn, values in results.items():
        print(f"| {attn} | {best[attn]:.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    print(f"sdpa / eager = {best['sdpa'] / best['eager']:.2f}")
    args.out.write_text(
        json.dumps({"results": results, "best": best, "threads": torch.get_num_threads()}, indent=2)
    )


if __name__ == "__main__":
    main()
