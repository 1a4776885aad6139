"""Named model sizes (`MLLMConfig.from_preset`): every preset builds a valid config, overrides merge, the toy
preset is the size the toy world's model directory is written with, and an unknown name is refused."""

from __future__ import annotations

import pytest

from mllm.model.config import MLLMConfig
from mllm.model.presets import PRESETS, preset_fields
from mllm.toy.tokenizer import ToyPresetConfig, model_config

COMPARED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "image_size",
    "patch_size",
    "query_num",
    "drop_vision_last_layer",
    "num_vision_layers",
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    config = MLLMConfig.from_preset(name)
    assert config.hidden_size % config.num_attention_heads == 0 and config.vision.hidden_size > 0


def test_defaults_are_minicpmv_26_and_overrides_merge():
    full = MLLMConfig.from_preset("minicpmv-2.6")
    assert (full.hidden_size, full.num_hidden_layers, full.vision.hidden_size, full.num_vision_layers) == (
        3584,
        28,
        1152,
        26,
    )
    wide = MLLMConfig.from_preset("bench-tiny", hidden_size=256, vision_config={"hidden_size": 128})
    assert (wide.hidden_size, wide.vision.hidden_size, wide.vision.num_hidden_layers) == (256, 128, 2)
    assert PRESETS["bench-tiny"]["hidden_size"] == 128  # the registry itself is not changed by overrides
    assert preset_fields("tiny-llm")["vocab_size"] == 97


def test_toy_preset_is_the_size_the_toy_world_writes():
    written = MLLMConfig.from_dict(model_config(600, 1, 2, ToyPresetConfig()))
    named = MLLMConfig.from_preset("toy", vocab_size=600)
    assert {k: getattr(named, k) for k in COMPARED} == {k: getattr(written, k) for k in COMPARED}
    assert named.vision == written.vision and named.slice_config["max_slice_nums"] == 1


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'llama'; known: minicpmv-2.6"):
        MLLMConfig.from_preset("llama")
