"""Named model sizes, in the style of litgpt's `Config.from_name`: `MLLMConfig.from_preset("toy", **overrides)`.

A preset is a set of `MLLMConfig` fields over its defaults (which are MiniCPM-V 2.6's). The benchmarks, the tests and
the toy world's model name their sizes here instead of spelling them each in their own vocabulary. `vision_config`
overrides are merged key by key into the preset's.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "minicpmv-2.6": {},
    # MiniCPM-V 2.6 (8.1B): Qwen2-7B + SigLIP-so400m (27 layers, the last dropped) + a 64-query resampler;
    # MLLMConfig's defaults.
    "toy": dict(
        # The toy world's model (`mllm toy tokenizer --preset`, the demo): 4.5M parameters that learn 112-px
        # shapes on 2 CPU cores; one 112-px slice of 64 patches per image, 16 image rows. The vocabulary comes
        # from the toy tokenizer (600 by default), so it is left at the default here and set when it is known.
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        image_size=112,
        patch_size=14,
        query_num=16,
        drop_vision_last_layer=False,
        vision_config=dict(
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=2,
            num_hidden_layers=4,
            image_size=112,
            patch_size=14,
        ),
        slice_config=dict(max_slice_nums=1, patch_size=14, scale_resolution=112),
    ),
    "bench-tiny": dict(
        # The GPU benchmarks' --tiny model: the same code paths in seconds on a CPU.
        vocab_size=1024,
        hidden_size=128,  # the resampler's smallest width
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        query_num=64,
        vision_config=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2),
    ),
    "tiny-llm": dict(
        # The LLM tests' decoder: fields that MLLMConfig, transformers' Qwen2Config and LlamaConfig all take.
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}
"""Preset name -> MLLMConfig fields over the defaults."""


def preset_fields(name: str, **overrides: Any) -> dict[str, Any]:
    """The MLLMConfig fields of preset `name` with `overrides` on top (`vision_config` and `slice_config` merged
    key by key); a ValueError names the known presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    fields = copy.deepcopy(PRESETS[name])
    for key, value in overrides.items():
        if key in ("vision_config", "slice_config") and isinstance(value, dict):
            fields[key] = {**fields.get(key, {}), **value}
        else:
            fields[key] = value
    return fields
