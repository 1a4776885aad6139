"""The optional convolutional stems of the vision tower (`vision_config["stem"]` "conv" and "cnn")."""

from __future__ import annotations

import pytest
import torch

from mllm.model.config import MLLMConfig, VisionConfig
from mllm.model.vision import VisionTransformer
from mllm.toy.stems import ConvStem, ImageCNNStem, image_to_strip, strip_to_image

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}


def _tower(**extra) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VisionConfig(**VISION, **extra), num_layers=1).eval()


def test_default_is_the_siglip_patch_conv() -> None:
    tower = _tower()
    assert tower.embeddings.stem is None
    assert tower.embeddings.patch_embedding.kernel_size == (14, 14)
    assert not any(name.startswith("embeddings.stem") for name in tower.state_dict())


def two_slices(patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random strips of two slices (slice 0: 2x3 patches; slice 1: 2x2 patches + 2 padded), their sizes and mask."""
    strips = torch.randn(2, 3, patch, 6 * patch)
    sizes = torch.tensor([[2, 3], [2, 2]], dtype=torch.int32)
    mask = torch.tensor([[[True] * 6], [[True] * 4 + [False] * 2]])
    return strips, sizes, mask


def test_conv_stem_keeps_one_token_per_patch_and_masks_nothing_else() -> None:
    tower = _tower(stem="conv", stem_channels=8, stem_layers=3)
    assert isinstance(tower.embeddings.stem, ConvStem)
    assert tower.embeddings.patch_embedding.kernel_size == (7, 7)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in tower.embeddings.stem.modules()) == 3
    strips, sizes, mask = two_slices(patch=14)
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


def test_strip_and_image_layouts_are_inverse() -> None:
    image = torch.randn(3, 2 * 8, 3 * 8)  # a 2x3-patch slice, patch 8
    patches = [image[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] for r in range(2) for c in range(3)]
    strip = torch.cat([*patches, torch.zeros(3, 8, 2 * 8)], dim=2)  # row-major patches + 2 padded
    assert torch.equal(strip_to_image(strip, 2, 3), image)
    assert torch.equal(image_to_strip(image, 2, 3, length=8), strip)


def test_cnn_stem_sees_across_patch_borders_and_keeps_slices_apart() -> None:
    tower = _tower(stem="cnn", patch_size=8, stem_channels=4, stem_layers=3)
    assert isinstance(tower.embeddings.stem, ImageCNNStem)
    assert tower.embeddings.patch_embedding.kernel_size == (1, 1)
    strips, sizes, mask = two_slices(patch=8)
    out = tower(strips, mask, sizes)
    assert out.shape == (2, 6, 32)
    # Patch 4 of slice 0 is the one below patch 1: its pixels change patch 1's token (the "conv" stem's cannot).
    changed = strips.clone()
    changed[0, :, :, 4 * 8 : 5 * 8] = 0.0
    again = tower(changed, mask, sizes)
    assert not torch.allclose(again[0, 1], out[0, 1])
    assert torch.allclose(again[1, :4], out[1, :4])  # the other slice is untouched
    # Padding after a slice's patches does not leak into its tokens.
    padded = strips.clone()
    padded[1, :, :, 4 * 8 :] = 5.0
    assert torch.allclose(tower(padded, mask, sizes)[1, :4], out[1, :4])


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
    with pytest.raises(ValueError, match="divisible by 2\\*\\*stem_layers"):
        _config(stem="cnn", patch_size=14, stem_layers=3)
    assert _config(stem="cnn", patch_size=8, stem_layers=3).vision.stem == "cnn"


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

    cnn = fresh(stem="cnn", patch_size=8, stem_layers=3, position_init_std=0.0).vpm.embeddings
    assert cnn.position_embedding.weight.abs().max().item() == 0.0
    first = cnn.stem.layers[0].weight  # PyTorch's fan-in init (bound 1/sqrt(27)), not N(0, initializer_range)
    assert first.abs().max().item() <= 27**-0.5 and first.std().item() > 0.08

    default = fresh().vpm.embeddings.position_embedding.weight
    wide = fresh(position_init_std=0.5).vpm.embeddings.position_embedding.weight
    assert default.std().item() == pytest.approx(0.02, rel=0.05)
    assert wide.std().item() == pytest.approx(0.5, rel=0.05)
