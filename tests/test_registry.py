"""The registry of vision stems and projectors (mllm.model.registry): unknown names are refused with the field and the
known names, and a checkpoint naming the toy world's options loads in a fresh process that never imported mllm.toy,
with the state-dict keys they had before they moved to mllm.toy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mllm.model.config import MLLMConfig
from mllm.model.modeling import MLLMModel
from mllm.model.registry import register_projector, register_stem
from mllm.model.resampler import Resampler
from mllm.toy.projectors import TokenProjector


def tiny_config(vision: dict | None = None, **overrides) -> MLLMConfig:
    """The benchmarks' tiny preset with 4 rows per slice and a 56-pixel position table."""
    vision_config = {"image_size": 56, **(vision or {})}
    return MLLMConfig.from_preset("bench-tiny", query_num=4, vision_config=vision_config, **overrides)


def test_unknown_names_are_refused_with_the_field_and_the_known_names() -> None:
    with pytest.raises(ValueError) as error:
        tiny_config(projector="linear")
    assert (
        str(error.value) == "MLLMConfig.projector must be one of ['merge', 'mlp', 'resampler'], got 'linear'"
    )
    with pytest.raises(ValueError) as error:
        tiny_config({"stem": "resnet"})
    assert (
        str(error.value)
        == "MLLMConfig.vision_config.stem must be one of ['cnn', 'conv', 'patch'], got 'resnet'"
    )


def test_a_name_cannot_be_taken_twice() -> None:
    with pytest.raises(ValueError, match="'resampler' is already registered"):
        register_projector("resampler", TokenProjector)
    with pytest.raises(ValueError, match="'mlp' is already registered"):
        register_projector("mlp", Resampler)
    with pytest.raises(ValueError, match="'patch' is already registered"):
        register_stem("patch", TokenProjector)
    register_projector("mlp", TokenProjector)  # the same class again (a re-import) is fine


PROBE = """
import sys, torch
from mllm.model.modeling import MLLMModel
assert not any(name.startswith("mllm.toy") for name in sys.modules), "mllm.toy imported before the lookup"
model = MLLMModel.from_pretrained(sys.argv[1]).eval()
strip = torch.linspace(0, 1, 3 * 8 * 16 * 8).reshape(3, 8, 16 * 8)
rows = model.get_vision_hidden_states({"pixel_values": [[strip]], "tgt_sizes": [torch.tensor([[4, 4]])]})[0]
torch.save(rows, sys.argv[2])
print(type(model.resampler).__name__, type(model.vpm.embeddings.stem).__name__)
"""


def test_a_toy_checkpoint_loads_in_a_fresh_process_with_its_old_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLLMModel(tiny_config({"stem": "cnn", "patch_size": 8, "stem_layers": 3}, projector="mlp")).eval()
    model.save_pretrained(tmp_path / "model")
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {
        "vpm.embeddings.stem.layers.0.weight",
        "vpm.embeddings.stem.layers.7.bias",
        "resampler.fc1.weight",
    } <= keys
    assert json.loads((tmp_path / "model" / "config.json").read_text())["projector"] == "mlp"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "model"), str(tmp_path / "rows.pt")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["TokenProjector", "ImageCNNStem"]
    strip = torch.linspace(0, 1, 3 * 8 * 16 * 8).reshape(3, 8, 16 * 8)
    rows = model.get_vision_hidden_states({"pixel_values": [[strip]], "tgt_sizes": [torch.tensor([[4, 4]])]})[
        0
    ]
    assert torch.equal(torch.load(tmp_path / "rows.pt"), rows)
