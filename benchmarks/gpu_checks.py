"""CUDA correctness checks of the model on a small random MiniCPM-V-shaped model (a minute on one GPU).

Usage:
    python benchmarks/gpu_checks.py --out gpu_checks.json
    python benchmarks/gpu_checks.py --device cpu      # the script's own smoke test (CPU against CPU; what CI runs)

The parity tests run on CPU in CI; this script checks the same forward and generation paths on CUDA:
1. fp32 logits on CUDA against CPU (same weights, a batch of two prompts with images, one padded);
2. eager, SDPA and (when the flash-attn package is installed) flash-attention-2 on CUDA against each other
   (flash in bf16, against SDPA in bf16);
3. bf16 on CUDA against fp32 on CPU (relative error of the logits);
4. greedy tokens on CUDA against CPU (fp32): transformers' generate, our static-cache decoder, compiled and not;
5. one training step on CUDA (loss and every gradient finite).
Each check prints its figure and its verdict; the JSON holds them all. The exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm.model.inputs import MLLMInputs

SHAPE = dict(
    hidden_size=256, intermediate_size=512, vision_config=dict(hidden_size=128, intermediate_size=256)
)
"""The checked model: the benchmarks' `bench-tiny` preset, twice as wide."""
CORPUS = ["A red circle and a blue square on a white table.", "Describe this image in detail, please."] * 8


def build(workdir: Path):
    from transformers import AutoTokenizer

    from mllm.model.config import MLLMConfig
    from mllm.model.modeling import MLLMModel
    from mllm.processing.image_processing import MLLMImageProcessor
    from mllm.processing.processor import MLLMProcessor
    from mllm.toy.tokenizer import build_toy_tokenizer

    torch.manual_seed(0)
    model = MLLMModel(MLLMConfig.from_preset("bench-tiny", **SHAPE, attn_implementation="eager")).eval()
    build_toy_tokenizer(CORPUS, workdir / "tokenizer", vocab_size=600)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    processor = MLLMProcessor(tokenizer, MLLMImageProcessor(scale_resolution=224, max_slice_nums=4))
    return model, tokenizer, processor


def images(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(300, 200), (224, 224), (180, 320)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:n]]


def logits(model, batch: dict, attn: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    model = copy.deepcopy(model).to(device, dtype)
    model.config._attn_implementation = attn  # what tests/test_model_fixture.py switches
    model.llm.config._attn_implementation = attn
    with torch.inference_mode():
        out = model(MLLMInputs(batch).to(device)).logits.float().cpu()  # a moved copy
    mask = batch["attention_mask"].bool()
    return out[mask]  # [real tokens, vocab]: padded rows are not compared


def greedy_tokens(model, chat: dict, tokenizer, **options) -> torch.Tensor:
    """24 greedy tokens per prompt (no early stop: a random model picks terminators at once)."""
    with torch.inference_mode():
        tokens = model.generate(
            chat,
            tokenizer=tokenizer,
            do_sample=False,
            num_beams=1,
            max_new_tokens=24,
            min_new_tokens=24,
            **options,
        )
    return tokens.cpu()


def check(results: dict, name: str, value: float, limit: float) -> None:
    ok = bool(value <= limit)
    results[name] = {"value": value, "limit": limit, "ok": ok}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_checks.json")
    parser.add_argument("--device", default="cuda", help="the device checked against CPU (default cuda)")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs CUDA (or --device cpu for a smoke test)")
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    results: dict[str, Any] = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, processor = build(Path(tmp))
        pics = images(2)
        prompts = [
            processor.prepare_chat_inputs([{"role": "user", "content": [pics[0], "Describe this image."]}])[
                0
            ],
            processor.prepare_chat_inputs(
                [{"role": "user", "content": [pics[1], "What is on the table, and where is it exactly?"]}]
            )[0],
        ]
        batch = processor(prompts, [[pics[0]], [pics[1]]])
        reference = logits(model, batch, "eager", "cpu", torch.float32)
        results["logit_scale"] = reference.abs().max().item()
        for attn in ("eager", "sdpa"):
            diff = (logits(model, batch, attn, device, torch.float32) - reference).abs().max().item()
            check(results, f"logits fp32 {device} {attn} vs cpu eager (max abs)", diff, 1e-3)
        bf16_sdpa = logits(model, batch, "sdpa", device, torch.bfloat16)
        rel = ((bf16_sdpa - reference).norm() / reference.norm()).item()
        check(results, f"logits bf16 {device} sdpa vs fp32 cpu (relative norm)", rel, 3e-2)
        if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
            flash = logits(model, batch, "flash_attention_2", device, torch.bfloat16)
            rel = ((flash - bf16_sdpa).norm() / bf16_sdpa.norm()).item()
            check(results, "logits bf16 flash_attention_2 vs sdpa (relative norm)", rel, 1e-2)
        else:
            results["flash_attention_2"] = "not checked: needs CUDA and the flash-attn package"
            print("skip flash_attention_2: needs CUDA and the flash-attn package", flush=True)

        msgs = [[{"role": "user", "content": [p, q]}] for p, q in zip(pics, ["Describe it.", "Where is it?"])]
        chat = processor.chat_batch(msgs)
        gpu = copy.deepcopy(model).to(device)
        tokens_cpu = greedy_tokens(model, chat, tokenizer)
        for path, options in (
            ("transformers generate", {}),
            ("static cache", dict(fast=True, fast_compile=False)),
            ("static cache, compiled", dict(fast=True)),
        ):
            tokens = greedy_tokens(gpu, chat, tokenizer, **options)
            check(
                results,
                f"greedy tokens {device} ({path}) differing from cpu",
                (tokens != tokens_cpu).sum().item(),
                0,
            )

        gpu.train()
        batch = MLLMInputs(batch).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = gpu(batch, labels=labels).loss
        loss.backward()
        grads = [p.grad for p in gpu.parameters() if p.requires_grad]
        bad = sum(g is None or not torch.isfinite(g).all().item() for g in grads)
        results["train_loss"] = loss.item()
        check(
            results,
            f"training step on {device}: parameters without a finite gradient",
            bad,
            0,
        )
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok", True)]
    print(f"{len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
