"""The `projector="merge"` and `"mlp"` options (mllm.toy.projectors): one row per 2x2 block of patches or per token, any
grid pooled to fit, and a model that builds, runs, saves and loads with them while the default stays the resampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.model.config import MLLMConfig
from mllm.model.modeling import MLLMModel
from mllm.model.resampler import Resampler
from mllm.toy.projectors import PatchMerger, TokenProjector


def rows_moved(projector, x: torch.Tensor, sizes: torch.Tensor, token: int, delta) -> torch.Tensor:
    """[Q]: how far each output row of the first slice moves when `delta` is added to its token `token`."""
    base = projector(x, sizes)
    changed = x.clone()
    changed[0, token] += delta
    return (projector(changed, sizes) - base).abs().amax(dim=-1)[0]


def test_each_row_reads_only_its_own_2x2_block() -> None:
    torch.manual_seed(0)
    merger = PatchMerger(num_queries=16, embed_dim=32, kv_dim=8).eval()
    x = torch.randn(1, 64, 8)
    sizes = torch.tensor([[8, 8]])
    assert merger(x, sizes).shape == (1, 16, 32)
    # Patch (row 5, col 2) lies in block (2, 1), i.e. output row 2 * 4 + 1 = 9.
    moved = rows_moved(merger, x, sizes, 5 * 8 + 2, 1.0)
    assert moved[9] > 1e-4
    assert torch.all(moved[torch.arange(16) != 9] == 0)


def test_token_projector_maps_each_token_to_its_own_row() -> None:
    torch.manual_seed(0)
    projector = TokenProjector(num_queries=49, embed_dim=32, kv_dim=8).eval()
    x = torch.randn(1, 49, 8)
    sizes = torch.tensor([[7, 7]])
    assert projector(x, sizes).shape == (1, 49, 32)
    moved = rows_moved(
        projector, x, sizes, 3 * 7 + 5, torch.randn(8)
    )  # token (3, 5) is row 26, nothing else moves
    assert moved[26] > 1e-4
    assert torch.all(moved[torch.arange(49) != 26] == 0)
    # another grid is pooled to 7 x 7; padding after a 2x2 slice does not leak in
    x = torch.randn(2, 60, 8)
    x[1, 4:] = 1e6
    out = projector(x, torch.tensor([[6, 10], [2, 2]]))
    assert out.shape == (2, 49, 32) and torch.isfinite(out).all() and out[1].abs().max() < 1e3
    with pytest.raises(ValueError, match="perfect square for projector 'mlp'"):
        TokenProjector(num_queries=12, embed_dim=16, kv_dim=4)


def test_other_grids_are_pooled_and_padding_is_ignored() -> None:
    merger = PatchMerger(num_queries=16, embed_dim=16, kv_dim=4)
    x = torch.randn(2, 60, 4)
    x[1, 4:] = 1e6  # padding after a 2x2 slice must not leak in
    out = merger(x, torch.tensor([[6, 10], [2, 2]]))
    assert out.shape == (2, 16, 16)
    assert torch.isfinite(out).all() and out[1].abs().max() < 1e3


def test_query_num_must_be_a_square() -> None:
    with pytest.raises(ValueError, match="query_num must be a perfect square"):
        PatchMerger(num_queries=12, embed_dim=16, kv_dim=4)


def tiny_config(**overrides) -> MLLMConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        query_num=4,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 56,
        },
        drop_vision_last_layer=False,
    )
    fields.update(overrides)
    return MLLMConfig(**fields)


def test_model_with_merge_projector_runs_saves_and_loads(tmp_path: Path) -> None:
    assert isinstance(MLLMModel(tiny_config()).resampler, Resampler)  # the default is MiniCPM-V's
    torch.manual_seed(0)
    model = MLLMModel(tiny_config(projector="merge")).eval()
    assert isinstance(model.resampler, PatchMerger)
    strips = [torch.randn(3, 14, 16 * 14)]
    data = {"pixel_values": [strips], "tgt_sizes": [torch.tensor([[4, 4]])]}
    rows = model.get_vision_hidden_states(data)[0]
    assert rows.shape == (1, 4, 128)
    model.save_pretrained(tmp_path)
    loaded = MLLMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.projector == "merge"
    assert torch.allclose(loaded.get_vision_hidden_states(data)[0], rows)


def test_model_with_mlp_projector_runs_saves_and_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLLMModel(tiny_config(projector="mlp")).eval()
    assert isinstance(model.resampler, TokenProjector)
    data = {"pixel_values": [[torch.randn(3, 14, 16 * 14)]], "tgt_sizes": [torch.tensor([[4, 4]])]}
    rows = model.get_vision_hidden_states(data)[0]
    assert rows.shape == (1, 4, 128)  # query_num 4: the 4x4 grid pooled to 2x2
    model.save_pretrained(tmp_path)
    loaded = MLLMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.projector == "mlp" and isinstance(loaded.resampler, TokenProjector)
    assert torch.allclose(loaded.get_vision_hidden_states(data)[0], rows)


def test_unknown_projector_is_refused() -> None:
    with pytest.raises(ValueError, match="MLLMConfig.projector must be one of"):
        tiny_config(projector="linear")


def test_normalized_image_rows_are_centred_unit_rms_and_survive_a_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLLMModel(tiny_config(projector="merge", normalize_image_rows=True)).eval()
    strips = [torch.randn(3, 14, 16 * 14), torch.randn(3, 14, 16 * 14)]
    data = {"pixel_values": [strips], "tgt_sizes": [torch.tensor([[4, 4], [4, 4]])]}
    rows = model.get_vision_hidden_states(data)[0]  # [2 slices, 4, 128]
    assert torch.allclose(
        rows.mean(dim=1), torch.zeros(2, 128), atol=1e-5
    )  # each slice centred over its rows
    assert torch.allclose(rows.pow(2).mean(dim=(1, 2)), torch.ones(2), atol=1e-4)
    model.config.normalize_image_rows = False
    raw = model.get_vision_hidden_states(data)[0]
    assert not torch.allclose(raw, rows)  # the option is what changed them
    model.config.normalize_image_rows = True
    model.save_pretrained(tmp_path)
    loaded = MLLMModel.from_pretrained(tmp_path).eval()
    assert loaded.config.normalize_image_rows is True
    assert torch.allclose(loaded.get_vision_hidden_states(data)[0], rows)
