"""The real job at the real shape on one GPU, through the CLI: what a user runs on MiniCPM-V 2.6, rehearsed.

Usage (one GPU; about 5 minutes on an H200, the first thing to run on a GPU):
    python benchmarks/gpu_rehearsal.py --out benchmarks/results/gpu_rehearsal.json
    python benchmarks/gpu_rehearsal.py --tiny --out rehearsal.json      # every step on CPU at a tiny shape (CI)
    python benchmarks/gpu_rehearsal.py --only zero3_full fsdp_full ...  # some steps again (the checkpoint is kept)

The device machine has no network and its image (Python 3.12, torch 2.11) lacks deepspeed and pydantic and holds older
transformers / huggingface_hub. Carry wheels (the device README's recipe for `pip download --only-binary=:all:
--python-version 3.12 --platform manylinux...` into .whl): transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1
peft==0.21.2 accelerate==1.16.0 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5, plus deepspeed built here (`pip wheel --no-deps -w .whl deepspeed==0.19.8`: a pure-Python
wheel), then start the command with `pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export
PYTHONPATH=/tmp/site:$PWD &&` (every step's `python -m mllm` inherits it).

Every step is an `mllm` command in its own process (as a user runs it), in this order; estimates for one H200:
 1. checkpoint      a random-weight checkpoint of the 2.6 shape (8.1B parameters, the official key layout, bf16, 5 GB
                    shards), written shard by shard from tensors made on the GPU (no float32 copy on the host); the
                    toy BPE tokenizer (made in code: the real special tokens and chat template, a small vocabulary)
                    and the real slicing settings beside it                                               ~20 s
 2. answer          `mllm answer --fast-generate --strategy beam` on --answer-items synthetic 640x480 objhal_bench
                    items, batch 50 (the random model never ends early: every item decodes --answer-new-tokens) ~90 s
 3. sft_lora        `mllm train sft` with LoRA r64 in bf16, gradient checkpointing, --sft-steps steps of batch 1
                    (the shipped script's settings)                                                       ~40 s
 4. zero3_full      `torchrun --nproc_per_node 1 -m mllm train sft` full fine-tune under ZeRO-3, then the saved
                    model is loaded strictly and compared with the checkpoint: non-empty, every trained matrix
                    changed, the frozen tower not                                                         ~80 s
 5. logp            `mllm logp`: reference log-probs of --preference-pairs pairs                          ~15 s
 6. preference_lora `mllm train preference` with LoRA against those log-probs                             ~30 s
 7. eval_grounding  `mllm eval grounding` on --grounding-items REC records                                ~25 s
 8. fsdp_full       `torchrun --nproc_per_node 1 -m mllm train sft --fsdp` full fine-tune (FSDP2), then the same
                    strict reload and comparison as step 4 (accelerate runs FSDP on accelerators only: on CPU, in
                    --tiny, the step checks the command's refusal instead)                                ~70 s

Memory of the full fine-tunes on ONE 139-GiB GPU: bf16 weights (16 GB) + fp32 master weights (32 GB) + fp32 Adam
states (64 GB) + gradients exceed it. ZeRO-3 here keeps the master weights, gradients and Adam states in bf16
(DeepSpeed's `bf16_master_weights_and_grads` + `bf16_optimizer_states`; about 80 GB): offloading the fp32 states to
the CPU instead (97 GB of host memory) would make each step a CPU Adam pass over 8.1B parameters, longer than this
whole budget. Updates below bf16's resolution are lost that way (the RMSNorm weights at 1.0 do not move at lr 1e-3),
so the comparison asks every trained matrix to change, not every tensor. FSDP trains the bf16 weights with plain AdamW
(`--weights-dtype bfloat16` without `--bf16`: accelerate would upcast them to float32 for mixed precision). With
several GPUs ZeRO-3 shards the fp32 states instead (8 GPUs: 12 GB each), which is what configs/ds_zero3.json does.

The JSON (--out) is rewritten after every step, so a timeout still leaves the finished steps: per step its status,
wall time (process start and model loading included), tokens/s where tokens are counted (Trainer's count of input
tokens, padding included, over its train_runtime; for answers the decoded tokens over the wall time), and the peak GPU memory seen by
NVML while it ran; plus the GPU name and the library versions. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = (
    "checkpoint",
    "answer",
    "sft_lora",
    "zero3_full",
    "logp",
    "preference_lora",
    "eval_grounding",
    "fsdp_full",
)
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("rectangle", "ellipse")
DESCRIBE = "Describe this image in detail."

logger = logging.getLogger("gpu_rehearsal")


@dataclass
class Settings:
    """Sizes of the rehearsal (the --tiny ones are CI-sized)."""

    answer_items: int
    answer_new_tokens: int
    answer_batch: int
    sft_steps: int
    full_steps: int
    preference_pairs: int
    preference_steps: int
    grounding_items: int


FULL = Settings(300, 64, 50, 100, 3, 32, 16, 48)
TINY = Settings(6, 8, 3, 3, 2, 4, 2, 4)


# -- the checkpoint --------------------------------------------------------------------------------------------------


def write_checkpoint(out: Path, config, device: torch.device, dtype: torch.dtype, shard_bytes: int) -> dict:
    """config.json + safetensors shards of random weights in the model's key layout, made tensor by tensor on
    `device` and written shard by shard (peak host memory: one shard)."""
    from safetensors.torch import save_file

    from mllm.model.loading import random_tensor
    from mllm.model.modeling import MLLMModel

    with torch.device("meta"):
        model = MLLMModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("llm.lm_head.weight")
    generator = torch.Generator(device=device).manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = dtype
    config.save_pretrained(out)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups, start=1):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: random_tensor(k, shapes[k], dtype, device, generator).cpu() for k in keys}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    parameters = sum(int(np.prod(s)) for s in shapes.values())
    return {"parameters": parameters, "bytes": total, "shards": len(groups)}


def write_processor(out: Path, corpus: list[str], tiny: bool, vocab_size: int) -> None:
    """The toy BPE tokenizer (the real special tokens and chat template), padded to the model's `vocab_size`, and
    the slicing settings."""
    from transformers import AutoTokenizer

    from mllm.bench import pad_vocabulary
    from mllm.processing.image_processing import MLLMImageProcessor
    from mllm.processing.processor import MLLMProcessor
    from mllm.toy.tokenizer import build_toy_tokenizer

    build_toy_tokenizer(corpus, out / "tokenizer", vocab_size=700)
    pad_vocabulary(out / "tokenizer", vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    images = MLLMImageProcessor(scale_resolution=56, max_slice_nums=1) if tiny else MLLMImageProcessor()
    MLLMProcessor(tokenizer, images).save_pretrained(out)
    shutil.rmtree(out / "tokenizer")


# -- the data --------------------------------------------------------------------------------------------------------


def draw_scene(rng: np.random.Generator, size: tuple[int, int]):
    """A 640x480 picture: a noisy colour gradient with 1-3 coloured rectangles or ellipses; (image, objects)."""
    from PIL import Image, ImageDraw

    width, height = size
    ramp = np.linspace(60, 200, width)[None, :, None] * rng.uniform(0.5, 1.0, 3)
    pixels = np.clip(ramp + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        w, h = int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 8, height // 3))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = [x, y, x + w, y + h]
        (draw.rectangle if shape == "rectangle" else draw.ellipse)(box, fill=COLORS[color])
        objects.append({"color": color, "shape": shape, "bbox": box})
    return image, objects


def describe(objects: list[dict]) -> str:
    parts = [f"a {o['color']} {o['shape']}" for o in objects]
    return f"The picture shows {len(objects)} shapes on a gradient: " + ", ".join(parts) + "."


def write_data(folder: Path, settings: Settings) -> dict[str, Path]:
    """Images and the five input files, in the formats users bring (objhal_bench, SFT JSON, RLAIF-V, Shikra REC)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    count = max(
        settings.answer_items, settings.sft_steps, settings.preference_pairs, settings.grounding_items
    )
    scenes = []
    for i in range(count):
        image, objects = draw_scene(rng, (640, 480))
        path = f"images/{i:04d}.jpg"
        image.save(folder / path, quality=90)
        scenes.append((path, objects))
    questions = [
        {"image": str(folder / p), "question": DESCRIBE, "image_id": i} for i, (p, _) in enumerate(scenes)
    ]
    sft, preference, rec = [], [], []
    for i, (path, objects) in enumerate(scenes):
        first = objects[0]
        asked = first["color"] if i % 2 == 0 else next(c for c in COLORS if c != first["color"])
        yes = any(o["color"] == asked and o["shape"] == first["shape"] for o in objects)
        turns = [
            {
                "role": "user",
                "content": f"<image>\nIs there a {asked} {first['shape']}? Please answer yes or no.",
            },
            {"role": "assistant", "content": "Yes" if yes else "No"},
        ]
        if i % 3 == 0:
            turns = [
                {"role": "user", "content": f"<image>\n{DESCRIBE}"},
                {"role": "assistant", "content": describe(objects)},
            ]
        sft.append({"id": i, "image": path, "conversations": turns})
        wrong = [*objects, {"color": "yellow" if first["color"] != "yellow" else "red", "shape": "ellipse"}]
        preference.append(
            {
                "idx": i,
                "question": DESCRIBE,
                "chosen": describe(objects),
                "rejected": describe(wrong),
                "image_path": path,
            }
        )
        rec.append(
            {
                "img_path": path,
                "expression": f"the {first['color']} {first['shape']}",
                "bbox": first["bbox"],
                "height": 480,
                "width": 640,
            }
        )
    files = {
        "questions": folder / "objhal_bench.jsonl",
        "sft": folder / "sft_train.json",
        "preference": folder / "preference_train.json",
        "rec": folder / "rec_val.jsonl",
    }
    files["questions"].write_text("".join(json.dumps(q) + "\n" for q in questions[: settings.answer_items]))
    files["sft"].write_text(json.dumps(sft[: max(settings.sft_steps, settings.full_steps)]))
    files["preference"].write_text(json.dumps(preference[: settings.preference_pairs]))
    files["rec"].write_text("".join(json.dumps(r) + "\n" for r in rec[: settings.grounding_items]))
    return files


def corpus(files: dict[str, Path]) -> list[str]:
    """Every text the tokenizer will see (so that the toy BPE learns its words)."""
    texts = [DESCRIBE]
    for item in json.loads(files["sft"].read_text()):
        texts += [turn["content"] for turn in item["conversations"]]
    for item in json.loads(files["preference"].read_text()):
        texts += [item["chosen"], item["rejected"]]
    return texts * 4


# -- measuring a step ------------------------------------------------------------------------------------------------


class GpuMemoryPeak:
    """The most GPU memory NVML reports in use while the block runs (every process on the GPU; sampled each 0.1 s);
    None without an NVIDIA GPU or NVML."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no NVML here (CPU, --tiny): nothing to sample
            self._handle = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            self.peak_mib = max(self.peak_mib or 0.0, used)
            self._stop.wait(0.1)

    def __enter__(self) -> GpuMemoryPeak:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()


class Rehearsal:
    """Runs the steps, each as a command line, and keeps the JSON up to date."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = TINY if args.tiny else FULL
        self.work = Path(args.workdir)
        self.model = self.work / "model"
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(args.out)
        self.result = json.loads(self.out.read_text()) if args.only and self.out.is_file() else self.header()
        # this interpreter's bin first: its `ninja` builds DeepSpeed's CPU op (a ninja of another version on PATH hashes
        # the build commands differently and rebuilds it, a minute each time)
        path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path}
        if self.device.type == "cpu":
            self.env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))

    def header(self) -> dict:
        import accelerate
        import peft
        import safetensors
        import transformers

        try:
            import deepspeed

            deepspeed_version = deepspeed.__version__
        except ImportError:
            deepspeed_version = None
        return {
            "benchmark": "gpu_rehearsal",
            "tiny": self.args.tiny,
            "device": torch.cuda.get_device_name(0) if self.device.type == "cuda" else "cpu",
            "versions": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "deepspeed": deepspeed_version,
                "peft": peft.__version__,
                "accelerate": accelerate.__version__,
                "safetensors": safetensors.__version__,
            },
            "settings": vars(self.settings),
            "steps": {},
        }

    def save(self) -> None:
        from mllm.files import write_json_atomic

        write_json_atomic(self.out, self.result)

    def record(self, name: str, figures: dict) -> None:
        self.result["steps"][name] = figures
        self.save()
        logger.info("%s: %s", name, figures)

    def command(self, name: str, argv: list[str], launcher: list[str] | None = None) -> dict:
        """Run `mllm ARGV` (under `launcher`, e.g. torchrun, when given): status, wall time, peak GPU memory."""
        prefix = launcher or [sys.executable, "-m", "mllm"]
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with GpuMemoryPeak() as memory, open(log, "w") as handle:
            code = subprocess.run(
                [*prefix, *argv], env=self.env, stdout=handle, stderr=subprocess.STDOUT
            ).returncode
        figures = {
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_gpu_mib": memory.peak_mib,
            "exit": code,
        }
        if code:
            figures["log_tail"] = log.read_text(errors="replace")[-3000:]
        return figures

    def torchrun(self) -> list[str]:
        from mllm.train.launch import free_port

        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "1",
            "--master_port",
            str(free_port()),
            "-m",
            "mllm",
        ]

    # -- steps ------------------------------------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        from mllm.model.config import MLLMConfig

        start = time.perf_counter()
        self.files = write_data(self.work / "data", self.settings)
        config = MLLMConfig.from_preset("bench-tiny" if self.args.tiny else "minicpmv-2.6")
        dtype = torch.bfloat16
        figures = write_checkpoint(self.model, config, self.device, dtype, shard_bytes=5 * 10**9)
        write_processor(self.model, corpus(self.files), self.args.tiny, config.vocab_size)
        seconds = time.perf_counter() - start
        return {
            "status": "ok",
            "wall_s": round(seconds, 1),
            "gb_per_s": round(figures["bytes"] / 1e9 / seconds, 2),
            **figures,
        }

    def answer(self) -> dict:
        s = self.settings
        out = self.work / "answers.jsonl"
        out.unlink(missing_ok=True)
        argv = ["answer", str(self.model), "--questions", str(self.files["questions"]), "--out", str(out)]
        argv += ["--strategy", "beam", "--batch-size", str(s.answer_batch), "--fast-generate"]
        argv += ["--max-new-tokens", str(s.answer_new_tokens), *self.device_flags()]
        figures = self.command("answer", argv)
        if figures["exit"] == 0:
            answered = len(out.read_text().splitlines())
            figures["items"] = answered
            figures["decoded_tokens_per_s_upper"] = round(
                answered * s.answer_new_tokens / figures["wall_s"], 1
            )
            figures["status"] = "ok" if answered == s.answer_items else f"failed: {answered} answers"
        return figures

    def device_flags(self) -> list[str]:
        return ["--device", self.device.type] + (
            ["--dtype", "bfloat16"] if self.device.type == "cuda" else []
        )

    def train_argv(self, command: str, data: Path, out: Path, steps: int) -> list[str]:
        argv = ["train", command, "--model", str(self.model), "--data", str(data), "--image-folder"]
        argv += [str(self.work / "data"), "--output-dir", str(out), "--max-steps", str(steps)]
        argv += [
            "--per-device-train-batch-size",
            "1",
            "--gradient-checkpointing",
            "true",
            "--save-strategy",
            "no",
        ]
        argv += ["--logging-steps", "1", "--report-to", "none", "--max-length", "2048", "--seed", "0"]
        return argv + ["--include-num-input-tokens-seen", "true"]

    def lora(self) -> list[str]:
        return [
            "--use-lora",
            "true",
            "--tune-llm",
            "false",
            "--lora-r",
            "64",
            "--lora-alpha",
            "64",
            "--bf16",
            "true",
        ]

    def trained(self, name: str, figures: dict, out: Path) -> dict:
        """Trainer's figures (tokens seen over train_runtime) from the run's trainer_state.json."""
        if figures["exit"]:
            return {**figures, "status": "failed"}
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        final = history[-1]
        tokens = max((row.get("num_input_tokens_seen", 0) for row in history), default=0)
        figures.update(
            status="ok",
            steps=final.get("step"),
            train_runtime_s=final.get("train_runtime"),
            tokens=tokens,
            tokens_per_s=round(tokens / final["train_runtime"], 1) if final.get("train_runtime") else None,
            final_loss=next((row["loss"] for row in reversed(history) if "loss" in row), None),
        )
        return figures

    def sft_lora(self) -> dict:
        out = self.work / "sft_lora"
        argv = self.train_argv("sft", self.files["sft"], out, self.settings.sft_steps) + self.lora()
        figures = self.trained("sft_lora", self.command("sft_lora", argv + ["--learning-rate", "1e-4"]), out)
        if figures["status"] == "ok" and not (out / "adapter_model.safetensors").is_file():
            figures["status"] = "failed: no adapter saved"
        return figures

    def full_finetune(self, name: str, engine: list[str], precision: list[str]) -> dict:
        out = self.work / name
        argv = self.train_argv("sft", self.files["sft"], out, self.settings.full_steps) + precision + engine
        figures = self.trained(
            name, self.command(name, argv + ["--learning-rate", "1e-3"], self.torchrun()), out
        )
        if figures["status"] == "ok":
            start = time.perf_counter()
            figures["reload"] = compare_with_base(out, self.model)
            figures["reload"]["wall_s"] = round(time.perf_counter() - start, 1)
            if not figures["reload"]["ok"]:
                figures["status"] = "failed: saved weights"
        shutil.rmtree(out, ignore_errors=True)  # 16 GB at the full shape: the disk holds 64
        return figures

    def zero3_full(self) -> dict:
        config = json.loads((ROOT / "configs" / "ds_zero3.json").read_text())
        config["bf16"] = {
            "enabled": "auto",
            "bf16_master_weights_and_grads": True,
            "bf16_optimizer_states": True,
        }
        path = self.work / "ds_zero3_bf16_states.json"
        path.write_text(json.dumps(config, indent=2))
        return self.full_finetune("zero3_full", ["--deepspeed", str(path)], ["--bf16", "true"])

    def fsdp_full(self) -> dict:
        if self.device.type != "cuda":
            figures = self.command(
                "fsdp_full", self.train_argv("sft", self.files["sft"], self.work / "fsdp", 1) + ["--fsdp"]
            )
            refused = (
                figures["exit"] == 2
                and "--fsdp needs GPUs" in (self.work / "logs" / "fsdp_full.log").read_text()
            )
            return {**figures, "status": "ok: refused on CPU, as it must be" if refused else "failed"}
        return self.full_finetune("fsdp_full", ["--fsdp"], ["--weights-dtype", "bfloat16"])

    def logp(self) -> dict:
        out = self.work / "reference_logps.jsonl"
        out.unlink(missing_ok=True)
        argv = [
            "logp",
            "--model",
            str(self.model),
            "--data",
            str(self.files["preference"]),
            "--out",
            str(out),
        ]
        argv += ["--image-folder", str(self.work / "data"), "--batch-size", "4"]
        figures = self.command("logp", argv)
        if figures["exit"] == 0:
            records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
            tokens = sum(r["chosen_tokens"] + r["rejected_tokens"] for r in records)
            figures.update(status="ok", pairs=len(records), response_tokens=tokens)
        else:
            figures["status"] = "failed"
        return figures

    def preference_lora(self) -> dict:
        out = self.work / "preference_lora"
        argv = self.train_argv("preference", self.files["preference"], out, self.settings.preference_steps)
        argv += self.lora() + ["--logps", str(self.work / "reference_logps.jsonl"), "--learning-rate", "1e-5"]
        return self.trained("preference_lora", self.command("preference_lora", argv), out)

    def eval_grounding(self) -> dict:
        out = self.work / "eval_grounding"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["eval", "grounding", str(self.model), "--data", str(self.files["rec"]), "--image-root"]
        argv += [
            str(self.work / "data"),
            "--out-dir",
            str(out),
            "--batch-size",
            "8",
            "--max-new-tokens",
            "32",
        ]
        figures = self.command("eval_grounding", argv + self.device_flags())
        predictions = out / "rec_val.predictions.jsonl"
        ok = figures["exit"] == 0 and predictions.is_file()
        figures["status"] = "ok" if ok else "failed"
        return figures

    def run(self) -> int:
        names = self.args.only or list(STEPS)
        if "checkpoint" not in names:
            self.files = {k: self.work / "data" / v for k, v in DATA_NAMES.items()}
        for name in names:
            try:
                figures = getattr(self, name)()
            except Exception as exc:  # recorded, and the next steps still run
                logger.exception("%s failed", name)
                figures = {"status": f"failed: {type(exc).__name__}: {exc}"}
            self.record(name, figures)
        failed = [n for n in names if not str(self.result["steps"][n].get("status", "")).startswith("ok")]
        self.result["failed"] = failed
        self.save()
        return 1 if failed else 0


DATA_NAMES = {
    "questions": "objhal_bench.jsonl",
    "sft": "sft_train.json",
    "preference": "preference_train.json",
    "rec": "rec_val.jsonl",
}


def compare_with_base(out: Path, base: Path) -> dict:
    """Load the saved model strictly (our loader: every key, every shape) and compare it with the checkpoint it was
    trained from, one tensor at a time: nothing empty, every trained matrix changed, the frozen tower unchanged."""
    from safetensors import safe_open

    from mllm.model.loading import checkpoint_files
    from mllm.model.modeling import MLLMModel

    model = MLLMModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    saved = model.state_dict()
    changed, matrices, frozen_changed, empty, unchanged = 0, 0, 0, 0, []
    for path in checkpoint_files(base):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                before, after = f.get_tensor(key), saved[key]
                empty += after.numel() == 0
                moved = not torch.equal(before, after.to(before.dtype))
                if key.startswith("vpm."):
                    frozen_changed += moved
                elif before.dim() >= 2:
                    matrices += 1
                    changed += moved
                    if not moved:
                        unchanged.append(key)
    ok = empty == 0 and changed == matrices and frozen_changed == 0
    return {
        "ok": ok,
        "trained_matrices": matrices,
        "changed": changed,
        "frozen_changed": frozen_changed,
        "empty": empty,
        "unchanged": unchanged[:10],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny shape and CI sizes, on CPU unless --device"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="gpu_rehearsal.json", help="the JSON, rewritten after every step")
    parser.add_argument(
        "--workdir", default=None, help="checkpoint, data and outputs (default: a temporary folder)"
    )
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run these steps (needs --workdir of a run)")
    args = parser.parse_args(argv)
    if args.only and args.workdir is None:
        parser.error("--only needs --workdir (the folder of the run whose checkpoint and data it reuses)")
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="mllm_rehearsal_")
    elif not args.only and Path(args.workdir).is_dir() and any(Path(args.workdir).iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: give a new folder (or --only to reuse a run's)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    return Rehearsal(args).run()


if __name__ == "__main__":
    sys.exit(main())
