"""Strict checkpoint loading for `MLLMModel` (saving is transformers' own `save_pretrained`).

Loading builds the module tree on the meta device (no memory), checks the checkpoint's key names against the model's
before reading any tensor, then reads one tensor at a time, casts and moves it, and assigns it into the model. Peak
memory is therefore one copy of the weights plus one tensor, which is what lets an 8B checkpoint load on a 32 GB box.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mllm.model.config import MLLMConfig

logger = logging.getLogger(__name__)

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

HUB_KWARGS = (
    "trust_remote_code",
    "adapter_kwargs",
    "_from_auto",
    "_from_pipeline",
    "revision",
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "local_files_only",
    "subfolder",
    "code_revision",
)
"""Download and remote-code options that transformers' Auto classes pass along to a
model's or a processor's `from_pretrained`; a local directory needs none, so both drop them."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred; a clear error when none or some are missing."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = model_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard files that do not exist: {missing}")
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
    )


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time; .bin files are memory-mapped so they are not read whole. A shard that
    cannot be read (truncated, corrupt) is a ValueError naming it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            yield from state.items()
    except (SafetensorError, RuntimeError, OSError, EOFError) as exc:
        raise ValueError(f"weights file {path} is unreadable (truncated or corrupt?): {exc}") from exc


def checkpoint_keys(files: list[Path]) -> set[str]:
    """Key names without reading tensors (safetensors headers; .bin files are mmapped); an unreadable shard is a
    ValueError naming it."""
    keys: set[str] = set()
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    keys.update(f.keys())
            else:
                keys.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True).keys())
        except (SafetensorError, RuntimeError, OSError, EOFError) as exc:
            raise ValueError(f"weights file {path} is unreadable (truncated or corrupt?): {exc}") from exc
    return keys


def check_keys(expected: set[str], found: set[str], optional: set[str], where: Path) -> None:
    """Raise one error that lists every missing and every unexpected key (sorted), so a user sees the whole story."""
    missing = sorted(expected - found - optional)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} does not match the model: {len(missing)} missing keys {missing[:50]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:50]}"
        )


def resolve_device(device_map, device) -> torch.device:
    """One target device: `device`, or a device_map that is a device string or {"": device}."""
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    target = device if device is not None else device_map
    if isinstance(target, dict):
        if set(target) != {""}:
            raise ValueError(f"device_map {target!r} is not supported: use a device or {{'': device}}")
        target = target[""]
    if target is None or target == "auto":
        target = "cuda" if target == "auto" and torch.cuda.is_available() else "cpu"
    return torch.device(target) if not isinstance(target, int) else torch.device("cuda", target)


def assign_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the (meta) parameter `key` by `tensor`, after a shape check that names the key."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, name)
    if tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(current.shape)}"
        )
    if isinstance(current, torch.nn.Parameter):
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=current.requires_grad))
    else:
        setattr(module, name, tensor)


def reset_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers (rotary table, resampler position table) on the real device."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers(device)


def random_tensor(
    name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """A weight at a realistic scale for shape-only runs (benchmarks): matrices N(0, 0.02); vectors named `weight`
    are norm scales (RMSNorm, LayerNorm, and the resampler's `ln_q`, `ln_kv`, `ln_post`, whose names lack "norm"): 1;
    biases 0."""
    if len(shape) >= 2:
        return (
            torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
        )
    if name.endswith(".weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    return torch.zeros(shape, device=device, dtype=dtype)


def fill_random_(model: torch.nn.Module, device: torch.device, seed: int = 0) -> None:
    """Every parameter of `model` (on `device`) filled by `random_tensor`'s rule. Fills parameters only; see
    `reset_buffers` for the non-persistent buffers."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, param.shape, param.dtype, param.device, generator))


def load_pretrained(
    cls, model_dir, dtype=None, device_map=None, device=None, attn_implementation=None, **config_kwargs
):
    """Build `cls` on meta from model_dir's config.json (or the `config` given, as AutoModel does) and fill it from
    its weights, strictly."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/config.json not found: is this a model directory?")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    config = config_kwargs.pop("config", None) or MLLMConfig.from_pretrained(model_dir, **config_kwargs)
    config._name_or_path = str(model_dir)  # recorded by peft as the base of an adapter trained on this model
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if dtype in (None, "auto"):
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    target = resolve_device(device_map, device)
    files = checkpoint_files(model_dir)
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict().keys())
    optional = {"llm.lm_head.weight"} if config.tie_word_embeddings else set()
    check_keys(expected, checkpoint_keys(files), optional, model_dir)
    count = 0
    for path in files:
        for key, tensor in iter_tensors(path):
            cast = tensor.to(dtype) if tensor.is_floating_point() else tensor
            assign_tensor(model, key, cast.to(target))
            count += 1
    logger.info(
        "loaded %d tensors from %d file(s) in %s as %s on %s", count, len(files), model_dir, dtype, target
    )
    if config.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.model.embed_tokens.weight
    reset_buffers(model, target)
    config.dtype = dtype
    model.eval()
    return model


MODEL_DIR_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
"""What `copy_model_dir` copies: a single-file checkpoint with its tokenizer."""


def copy_model_dir(model_dir: str | Path, out: str | Path, **preprocessor_overrides) -> Path:
    """A copy of a single-file model directory whose preprocessor_config.json has `preprocessor_overrides` applied
    (e.g. scale_resolution=56, max_slice_nums=1: small images stay one small slice, for fast training runs)."""
    model_dir, out = Path(model_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_DIR_FILES:
        (out / name).write_bytes((model_dir / name).read_bytes())
    pre = json.loads((model_dir / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre.update(preprocessor_overrides)
    (out / "preprocessor_config.json").write_text(json.dumps(pre), encoding="utf-8")
    return out
