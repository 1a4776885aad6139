"""Demo stages that make the inputs: the toy world, and the tokenizer + a freshly initialised tiny model.

Both call the library functions behind `mllm toy make` and `mllm toy tokenizer --preset`; the model is an ordinary
model directory (config.json, safetensors, tokenizer, preprocessor_config.json) that every command accepts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mllm.demo.config import DemoConfig

logger = logging.getLogger(__name__)

WORLD_STAGE = "world"
MODEL_STAGE = "model"


def world_dir(config: DemoConfig) -> Path:
    return config.out / WORLD_STAGE


def init_model_dir(config: DemoConfig) -> Path:
    return config.out / MODEL_STAGE / "init"


def make_world(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """The toy world in the real file formats; a half-written world from a killed run is replaced."""
    from mllm.toy.world import make_toy_world

    leftovers = [p for p in folder.iterdir() if p.name != "done.json"]
    counts = make_toy_world(
        folder,
        seed=config.seed,
        n_train=config.n_train,
        n_test=config.n_test,
        n_preference=min(config.n_preference, config.n_train),
        noise_rate=config.noise_rate,
        max_objects=config.max_objects,
        train_yes_no_pairs=config.train_yes_no_pairs,
        lookup_questions=config.lookup_questions,
        min_object_size=config.min_object_size,
        max_object_size=config.max_object_size,
        overwrite=bool(leftovers),
    )
    summary = (
        f"{counts['train_images']} train + {counts['test_images']} test images, {counts['sft_train_items']} SFT "
        f"items ({counts['noisy_train_descriptions']} noisy descriptions), {counts['rec_train']} REC records, "
        f"{counts['preference_pairs']} preference pairs"
    )
    return {**counts, "summary": summary}


def preset_vision_config(tokenizer_dir: Path, config: DemoConfig) -> dict[str, Any]:
    """The preset's vision_config with the demo's stem (see DemoConfig.vision_stem)."""
    from mllm.toy.tokenizer import load_tokenizer_facts, model_config

    vision = dict(model_config(*load_tokenizer_facts(tokenizer_dir), preset_config(config))["vision_config"])
    if config.vision_stem != "patch":
        vision.update(stem=config.vision_stem, stem_layers=3 if config.vision_stem == "cnn" else 2)
    vision["position_init_std"] = config.position_init_std
    return vision


def preset_config(config: DemoConfig):
    """The tiny preset's sizes with the demo's vision choices."""
    from mllm.toy.tokenizer import ToyPresetConfig

    return ToyPresetConfig(
        patch_size=config.patch_size,
        vision_layers=config.vision_layers,
        query_num=config.query_num,
        rope_theta=config.rope_theta,
        use_image_id=config.use_image_id,
    )


def make_model(config: DemoConfig, folder: Path) -> dict[str, Any]:
    """Tokenizer trained on the world's texts, the tiny preset, and its random initialisation (seeded)."""
    import torch

    from mllm.model.config import MLLMConfig
    from mllm.model.modeling import MLLMModel
    from mllm.toy.tokenizer import build_toy_tokenizer, toy_corpus, write_toy_preset

    tokenizer_dir = build_toy_tokenizer(
        toy_corpus(world_dir(config)), folder / "tokenizer", default_system=config.default_system_prompt
    )
    out = init_model_dir(config)
    write_toy_preset(
        out,
        tokenizer_dir,
        preset_config(config),
        vision_config=preset_vision_config(tokenizer_dir, config),
        projector=config.projector,
        normalize_image_rows=config.normalize_image_rows,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    torch.manual_seed(config.seed)
    model = MLLMModel(MLLMConfig.from_pretrained(out))
    model.save_pretrained(out)
    parameters = {
        part: sum(p.numel() for p in getattr(model, part).parameters())
        for part in ("vpm", "resampler", "llm")
    }
    total = sum(parameters.values())
    summary = (
        f"vocabulary {model.config.vocab_size}, {total / 1e6:.2f}M parameters (vision {parameters['vpm'] / 1e6:.2f}M, "
        f"resampler {parameters['resampler'] / 1e6:.2f}M, LLM {parameters['llm'] / 1e6:.2f}M), "
        f"vision stem {model.config.vision.stem}, projector {model.config.projector}"
    )
    return {
        "vocab_size": model.config.vocab_size,
        "parameters": parameters,
        "model_dir": str(out),
        "summary": summary,
    }
