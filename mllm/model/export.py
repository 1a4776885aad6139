"""Hand a model directory to the engines that serve MiniCPM-V: the official layout (`mllm export --format minicpmv`).

vLLM (`vllm serve OUT --trust-remote-code`), SGLang, SWIFT, LLaMA-Factory and transformers' `AutoModel` with
`trust_remote_code=True` read a MiniCPM-V 2.6 directory through the checkpoint's own Python files, named by the
`auto_map` of its config.json, tokenizer_config.json and preprocessor_config.json. Our weights already use the
official key names, so the export copies them unchanged and rewrites the metadata around them:

- config.json: `model_type` "minicpmv" (also inside `slice_config`), `architectures` ["MiniCPMV"], the base's
  `auto_map`, the dtype as `torch_dtype` (the field the official files use; transformers 5 writes `dtype`), and
  none of our from-scratch options (`projector`, `normalize_image_rows`, vision stems), which the official code does
  not have: a model that uses them is refused.
- tokenizer_config.json and preprocessor_config.json: ours, plus the base's `auto_map`, `tokenizer_class`,
  `image_processor_type` and `processor_class`.
- every `*.py` file of `--base` (the official checkpoint directory), copied byte for byte; a base without the files
  its `auto_map` names is refused.

The directory is written beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open

from mllm.model.loading import checkpoint_files

logger = logging.getLogger(__name__)

FORMATS = ("minicpmv",)
OFFICIAL_MODEL_TYPE = "minicpmv"
OFFICIAL_ARCHITECTURES = ["MiniCPMV"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
BASE_TOKENIZER_KEYS = ("auto_map", "tokenizer_class")
BASE_PREPROCESSOR_KEYS = ("auto_map", "image_processor_type", "processor_class")
# Our options for tiny models trained from scratch, with the value that means "as MiniCPM-V".
FROM_SCRATCH_OPTIONS = {"projector": "resampler", "normalize_image_rows": False}
FROM_SCRATCH_VISION_OPTIONS = {"stem": "patch"}
FROM_SCRATCH_VISION_KEYS = ("stem", "stem_channels", "stem_layers", "position_init_std")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def auto_map_modules(auto_map: Any) -> set[str]:
    """File names ("modeling_minicpmv.py", ...) that an `auto_map` points at ("module.Class" values, or lists of
    them for tokenizers; a "repo--module.Class" value names another repository's file)."""
    values = auto_map.values() if isinstance(auto_map, dict) else []
    refs = [
        v for value in values for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)
    ]
    return {f"{ref.split('--')[-1].rsplit('.', 1)[0]}.py" for ref in refs}


def remote_code_of(base_dir: Path) -> tuple[dict[str, dict], list[Path]]:
    """(the base's metadata files that carry an auto_map, by name; its .py files). Refuses a base that is not the
    official layout or lacks a file its auto_maps name."""
    if not (base_dir / "config.json").is_file():
        raise ValueError(
            f"--base {base_dir}: no config.json; pass the official MiniCPM-V checkpoint directory"
        )
    metadata = {
        name: read_json(base_dir / name)
        for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json")
        if (base_dir / name).is_file()
    }
    if "auto_map" not in metadata["config.json"]:
        raise ValueError(
            f"--base {base_dir}: config.json has no auto_map, so it is not the official remote-code layout "
            "(expected the directory of openbmb/MiniCPM-V-2_6 with configuration_minicpm.py, modeling_minicpmv.py, ...)"
        )
    needed = set().union(*(auto_map_modules(data.get("auto_map")) for data in metadata.values()))
    missing = sorted(name for name in needed if not (base_dir / name).is_file())
    if missing:
        raise ValueError(f"--base {base_dir}: its auto_map names {missing}, which are not in the directory")
    return metadata, sorted(base_dir.glob("*.py"))


def check_exportable(config: dict[str, Any], where: Path) -> None:
    """Refuse a model the official code cannot build (our from-scratch options)."""
    vision = config.get("vision_config") or {}
    for source, options, prefix in (
        (config, FROM_SCRATCH_OPTIONS, ""),
        (vision, FROM_SCRATCH_VISION_OPTIONS, "vision_config."),
    ):
        for key, official in options.items():
            if source.get(key, official) != official:
                raise ValueError(
                    f"{where}/config.json: {prefix}{key} is {source[key]!r}; the official MiniCPM-V code only has "
                    f"{official!r}, so this model cannot be exported to the minicpmv format"
                )


def official_config(config: dict[str, Any], base_config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Our config.json as the official one: model_type, architectures, auto_map, torch_dtype."""
    out = {
        k: v for k, v in config.items() if k not in FROM_SCRATCH_OPTIONS and k not in ("dtype", "torch_dtype")
    }
    out["vision_config"] = {
        k: v for k, v in (config.get("vision_config") or {}).items() if k not in FROM_SCRATCH_VISION_KEYS
    }
    out["model_type"] = OFFICIAL_MODEL_TYPE
    out["architectures"] = list(OFFICIAL_ARCHITECTURES)
    out["auto_map"] = base_config["auto_map"]
    out["torch_dtype"] = dtype
    if isinstance(out.get("slice_config"), dict):
        out["slice_config"] = {**out["slice_config"], "model_type": OFFICIAL_MODEL_TYPE}
    return dict(sorted(out.items()))


def weights_dtype(config: dict[str, Any], files: list[Path]) -> str:
    """The dtype name of the weights: the config's field, else the first floating tensor of the checkpoint."""
    named = config.get("torch_dtype") or config.get("dtype")
    if isinstance(named, str) and named != "auto":
        return named
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    dtype = f.get_slice(key).get_dtype()
                    if dtype.startswith(("F", "BF")):
                        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype, "float32")
    return "float32"


def with_base_keys(
    ours: dict[str, Any], base: dict[str, Any] | None, keys: tuple[str, ...]
) -> dict[str, Any]:
    return {**ours, **{k: base[k] for k in keys if base and k in base}}


def check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"{out_dir}: output directory is not empty (pass --overwrite to replace it)")


def export_minicpmv(
    model_dir: str | Path, out_dir: str | Path, base_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write `model_dir` in the official MiniCPM-V layout to `out_dir`, with `base_dir`'s remote code."""
    model_dir, out_dir, base_dir = Path(model_dir), Path(out_dir), Path(base_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json; is this a model directory?")
    check_target(out_dir, overwrite)
    if out_dir.resolve() in (model_dir.resolve(), base_dir.resolve()):
        raise ValueError(f"{out_dir}: write the export to a new directory, not over its input")
    base_meta, code_files = remote_code_of(base_dir)
    config = read_json(model_dir / "config.json")
    check_exportable(config, model_dir)
    weights = checkpoint_files(model_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        index = [model_dir / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")]
        for path in [*weights, *[p for p in index if p.is_file()]]:
            shutil.copyfile(path, staging / path.name)
        write_json(
            staging / "config.json",
            official_config(config, base_meta["config.json"], weights_dtype(config, weights)),
        )
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, staging / name)
        if (model_dir / "tokenizer_config.json").is_file():
            ours = read_json(model_dir / "tokenizer_config.json")
            base = base_meta.get("tokenizer_config.json")
            write_json(staging / "tokenizer_config.json", with_base_keys(ours, base, BASE_TOKENIZER_KEYS))
        if (model_dir / "preprocessor_config.json").is_file():
            ours = read_json(model_dir / "preprocessor_config.json")
            base = base_meta.get("preprocessor_config.json")
            write_json(
                staging / "preprocessor_config.json", with_base_keys(ours, base, BASE_PREPROCESSOR_KEYS)
            )
        generation = next(
            (
                d / "generation_config.json"
                for d in (model_dir, base_dir)
                if (d / "generation_config.json").is_file()
            ),
            None,
        )
        if generation is not None:
            shutil.copyfile(generation, staging / "generation_config.json")
        for path in code_files:
            shutil.copyfile(path, staging / path.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s to %s (minicpmv layout, remote code from %s)", model_dir, out_dir, base_dir)
    return out_dir


def carry_remote_code(config, out_dir: Path) -> None:
    """After a config is saved to `out_dir`: keep its `auto_map` true. A model loaded from the official layout keeps
    its auto_map, so its remote-code files come along from the directory it was loaded from; when they are not
    there, the saved config.json loses the auto_map (with a warning) instead of pointing at files that do not exist."""
    auto_map = getattr(config, "auto_map", None)
    if not auto_map:
        return
    source = Path(getattr(config, "_name_or_path", "") or ".")
    needed = sorted(auto_map_modules(auto_map))
    if all((source / name).is_file() for name in needed):
        for path in source.glob("*.py"):
            if not (out_dir / path.name).exists():
                shutil.copyfile(path, out_dir / path.name)
        return
    logger.warning(
        "%s: saved without auto_map: the remote-code files %s are not in %s (use `mllm export --format minicpmv "
        "--base OFFICIAL_DIR` for the official layout)",
        out_dir,
        needed,
        source,
    )
    saved = read_json(out_dir / "config.json")
    saved.pop("auto_map", None)
    write_json(out_dir / "config.json", saved)
