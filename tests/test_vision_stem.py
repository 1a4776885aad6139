"""The optional convolutional stem of the vision tower (`vision_config["stem"] = "conv"`)."""

from __future__ import annotations

import pytest
import torch

from mllm.model.config import MLLMConfig, VisionConfig
from mllm.model.vision import ConvStem, VisionTransformer

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}


def _tower(**extra) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VisionConfig(**VISION, **extra), num_layers=1).eval()


def test_default_is_the_siglip_patch_conv() -> None:
    tower = _tower()
    assert tower.embeddings.stem is None
    assert tower.embeddings.patch_embedding.kernel_size == (14, 14)
    assert not any(name.startswith("embeddings.stem") for name in tower.state_dict())


def test_conv_stem_keeps_one_token_per_patch_and_masks_nothing_else() -> None:
    tower = _tower(stem="conv", stem_channels=8, stem_layers=3)
    assert isinstance(tower.embeddings.stem, ConvStem)
    assert tower.embeddings.patch_embedding.kernel_size == (7, 7)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in tower.embeddings.stem.modules()) == 3
    strips = torch.randn(2, 3, 14, 6 * 14)  # slice 0: 2x3 patches; slice 1: 2x2 patches + 2 padded
    sizes = torch.tensor([[2, 3], [2, 2]], dtype=torch.int32)
    mask = torch.tensor([[[True] * 6], [[True] * 4 + [False] * 2]])
    out = tower(strips, mask, sizes)
    assert out.shape == (2, 6, 32)
    # A patch's token depends on its own pixels: changing the last patch of slice 0 changes its token.
    changed = strips.clone()
    changed[0, :, :, 5 * 14 :] = 0.0
    assert not torch.allclose(tower(changed, mask, sizes)[0, 5], out[0, 5])


def test_conv_stem_learns_where_an_edge_is_inside_a_patch() -> None:
    """The tokens of a patch whose left k columns are dark must tell k apart (a linear probe fits k)."""
    tower = _tower(stem="conv", stem_channels=8, stem_layers=2)
    strips = torch.ones(14, 3, 14, 14)
    for k in range(14):
        strips[k, :, :, :k] = -1.0
    sizes = torch.tensor([[1, 1]] * 14, dtype=torch.int32)
    feats = tower.embeddings(strips, sizes)[0][:, 0]  # [14, D]
    assert torch.linalg.matrix_rank(feats - feats.mean(0)) >= 5  # distinct, not one direction


def _config(**vision) -> MLLMConfig:
    return MLLMConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, vision_config={**VISION, **vision}
    )


def test_config_checks_the_stem() -> None:
    with pytest.raises(ValueError, match="vision_config.stem must be one of"):
        _config(stem="resnet")
    with pytest.raises(ValueError, match="even patch_size"):
        _config(stem="conv", patch_size=7)
    config = _config(stem="conv")
    assert config.vision.stem == "conv" and config.vision.stem_channels == 32


def test_position_init_std_only_changes_a_fresh_model() -> None:
    from mllm.model.modeling import MLLMModel

    def fresh(**vision) -> MLLMModel:
        torch.manual_seed(0)
        config = MLLMConfig(
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=50,
            query_num=4,
            vision_config={**VISION, **vision},
        )
        return MLLMModel(config)

    default = fresh().vpm.embeddings.position_embedding.weight
    wide = fresh(position_init_std=0.5).vpm.embeddings.position_embedding.weight
    assert default.std().item() == pytest.approx(0.02, rel=0.05)
    assert wide.std().item() == pytest.approx(0.5, rel=0.05)
