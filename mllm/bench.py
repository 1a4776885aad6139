"""Shared pieces of the GPU benchmarks (`benchmarks/gpu_*.py`): random-weight models built in code, a Qwen2 twin
of our decoder, a synthetic objhal_bench-size job, and raw result files that say what they were measured on.

Nothing is downloaded: models are built on the meta device and filled with random weights on the target device, the
tokenizer is the toy byte-level BPE built in code (same special tokens and chat template as MiniCPM-V's).
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from mllm.io import write_json_atomic
from mllm.model.config import MLLMConfig
from mllm.model.loading import fill_random_, reset_buffers
from mllm.model.modeling import MLLMModel
from mllm.processing.image_processing import MLLMImageProcessor
from mllm.processing.processor import MLLMProcessor
from mllm.toy.tokenizer import SPECIAL_TOKENS, build_toy_tokenizer, tokenizer_config, write_config_json

TOKENIZER_CORPUS = [
    "The image shows a man sitting on a couch with his dog while a cat sleeps on the chair.",
    "A woman in a red coat is riding a bicycle down a busy city street lined with parked cars.",
    "Describe this image in detail. What objects can you see, and where are they?",
    "On the dining table there are several cups, a bottle of wine and a bowl of oranges.",
]
JOB_QUESTION = "Describe this image in detail."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_metadata(benchmark: str, device: torch.device, argv: list[str] | None) -> dict[str, Any]:
    """What a raw result file must say about its run: the benchmark, device, library versions, date, command."""

    command = argv if argv is not None else sys.argv[1:]
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([f"benchmarks/{benchmark}.py", *command]),
    }


def add_run_flags(parser, default_out: str) -> None:
    """The flags every GPU benchmark takes: --tiny, --device, --out, --overwrite."""
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model on CPU: a smoke test in seconds"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--out", default=default_out, help="raw JSON results (rewritten after every row)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def check_at_least_one(args, names: tuple[str, ...]) -> None:
    """A ValueError naming the flag of the first of `names` below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def start_run(benchmark: str, args, argv: list[str] | None) -> tuple[torch.device, ResultFile]:
    """The device (--device, else cuda when there is one, cpu with --tiny) and the result file of a run, holding its
    metadata and settings."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    results = ResultFile(args.out, run_metadata(benchmark, device, argv), args.overwrite)
    results.set("settings", {k: v for k, v in vars(args).items() if k not in ("out", "overwrite")})
    return device, results


class ResultFile:
    """A JSON result file rewritten atomically after every measurement, so a run cut short keeps what finished.

    An existing file is never replaced silently: pass `overwrite=True` (the scripts' --overwrite) to replace it."""

    def __init__(self, path: str | Path, metadata: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ValueError(f"--out {self.path} exists: pass --overwrite to replace it, or another --out")
        self.payload: dict[str, Any] = {**metadata, "complete": False}
        self.write()

    def set(self, key: str, value: Any) -> None:
        self.payload[key] = value
        self.write()

    def append(self, key: str, row: dict[str, Any]) -> None:
        self.payload.setdefault(key, []).append(row)
        self.write()

    def finish(self) -> dict[str, Any]:
        self.set("complete", True)
        return json.loads(json.dumps(self.payload))

    def write(self) -> None:
        write_json_atomic(self.path, self.payload)


def model_preset(tiny: bool) -> str:
    """The benchmarks' model size: `bench-tiny` (--tiny: seconds on a CPU) or MiniCPM-V 2.6's 8B shape."""
    return "bench-tiny" if tiny else "minicpmv-2.6"


def random_mllm(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0, **overrides: Any):
    """MLLMModel of a named size (`MLLMConfig.from_preset`, `overrides` on top) with random weights: built on meta
    (no host memory), filled on `device`."""
    config = MLLMConfig.from_preset(preset, **overrides, attn_implementation="sdpa")
    with torch.device("meta"):
        model = MLLMModel(config)
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed)
    reset_buffers(model, device)
    return model.eval()


def qwen2_config(config) -> Any:
    """transformers' Qwen2Config with the decoder fields of an MLLMConfig."""

    fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "hidden_act",
    )
    if config.head_dim != config.hidden_size // config.num_attention_heads or not config.attention_bias:
        raise ValueError("a Qwen2 twin needs head_dim = hidden_size / heads and attention biases")
    return Qwen2Config(**{f: getattr(config, f) for f in fields}, attn_implementation="sdpa")


def random_qwen2(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """transformers' Qwen2ForCausalLM with the decoder shape of an MLLMConfig and random weights (same recipe)."""

    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config(config))
    model = model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed)
    return _rebuild_rotary(model, device)


def qwen2_twin(llm):
    """transformers' Qwen2ForCausalLM sharing our `LLMForCausalLM`'s weight tensors (no copy): the same network in
    the library's own implementation (tests/test_llm_parity.py: same logits and tokens)."""

    with torch.device("meta"):
        twin = Qwen2ForCausalLM(qwen2_config(llm.config))
    twin.load_state_dict(llm.state_dict(), strict=True, assign=True)
    return _rebuild_rotary(twin, llm.lm_head.weight.device).eval()


def _rebuild_rotary(model, device: torch.device):
    """Qwen2's rotary tables are non-persistent buffers (still on meta, or random after `to_empty`): rebuild them
    in float32 on `device`."""
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(rotary.config).to(device)
    return model


def toy_processor(workdir: Path, small_images: bool, vocab_size: int | None = None):
    """The toy BPE tokenizer (built in code) with MiniCPM-V's slicing settings (`small_images`: one 56-px view per
    image, for CPU smoke runs); with `vocab_size`, padded to the model's vocabulary (`pad_vocabulary`), as a model
    directory that mllm loads needs."""

    build_toy_tokenizer(TOKENIZER_CORPUS * 4, workdir / "tokenizer", vocab_size=600)
    if vocab_size is not None:
        pad_vocabulary(workdir / "tokenizer", vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    image_processor = (
        MLLMImageProcessor(scale_resolution=56, max_slice_nums=1) if small_images else MLLMImageProcessor()
    )
    return MLLMProcessor(tokenizer, image_processor)


def pad_vocabulary(tokenizer_dir: Path, vocab_size: int) -> None:
    """Grow the toy tokenizer to `vocab_size` entries, as the real one fills its embedding table: unreachable
    `<|unused_i|>` vocabulary entries go between the BPE vocabulary and the special tokens (whose ids move up).

    mllm refuses a tokenizer of at most half the config's `vocab_size` (a foreign or truncated tokenizer), and the
    real shape keeps its 151,666-row embedding; entries in the BPE vocabulary (not added tokens) keep loading fast."""

    path = tokenizer_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    fillers = vocab_size - len(vocab) - len(SPECIAL_TOKENS)
    if fillers < 0:
        raise ValueError(f"the toy tokenizer has more than {vocab_size} entries already")
    vocab.update({f"<|unused_{i}|>": len(vocab) + i for i in range(fillers)})
    for k, token in enumerate(data["added_tokens"]):
        token["id"] = len(vocab) + k
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    write_config_json(tokenizer_dir / "tokenizer_config.json", tokenizer_config(len(vocab)))


def write_job(workdir: Path, items: int, seed: int = 0) -> Path:
    """An objhal_bench-format question file: `items` questions on synthetic 640x480 JPEG images (smooth colour fields
    with noise, so JPEG sizes and decode times are realistic)."""

    rng = np.random.default_rng(seed)
    image_dir = workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    lines = []
    for i in range(items):
        a, b, c = rng.uniform(0.005, 0.03, 3)
        base = np.stack([np.sin(a * xx), np.cos(b * yy), np.sin(c * (xx + yy))], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = image_dir / f"{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        lines.append(json.dumps({"image": str(path), "question": JOB_QUESTION, "image_id": i}))
    questions = workdir / f"questions_{items}.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    return questions
