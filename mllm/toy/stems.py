"""The `VisionConfig.stem` options "conv" and "cnn": small convolutional stems before the patch convolution, for
tiny vision towers trained from scratch on the toy world (real checkpoints use the linear "patch" stem).

Both keep the NaViT strip layout (`mllm.model.vision`): they take the strips [N, 3, p, L*p] and return feature strips
[N, out_channels, k, L*k], on which the tower's patch convolution of side `patch_size` (= k) yields one token per
patch. Registered with `mllm.model.registry` when `mllm.toy` is imported; their weights sit under
`vpm.embeddings.stem.layers.*` as before they moved here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllm.model.config import VisionConfig


class ConvStem(nn.Module):
    """The "conv" stem: 3x3 convolutions (the first with stride 2) with GroupNorm and GELU.

    It runs on the patch strip itself, so the NaViT layout is untouched: a stride-2 convolution maps each p x p patch
    to a (p/2) x (p/2) cell exactly (p even), and the patch convolution of side p/2 that follows yields one token per
    patch. Horizontal neighbours in a strip are the patch's neighbours in its image row, so the 3x3 kernels also see
    a little across patch borders. Why it exists: a linear patch embedding trained from scratch learns colours fast
    but localises objects inside a patch slowly; a few non-linear filters first make edges explicit.
    """

    torch_default_patch_init = False
    """Whether the patch convolution after this stem keeps PyTorch's fan-in init (see MLLMModel._init_weights)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        channels, groups = config.stem_channels, math.gcd(config.stem_channels, 8)
        layers: list[nn.Module] = []
        in_channels = config.num_channels
        for i in range(config.stem_layers):
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, stride=2 if i == 0 else 1, padding=1),
                nn.GroupNorm(groups, channels),
                nn.GELU(),
            ]
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels
        self.patch_size = config.patch_size // 2

    @staticmethod
    def check_config(config: VisionConfig) -> None:
        """ValueError unless the config can build this stem."""
        if config.patch_size % 2 or config.stem_layers < 1 or config.stem_channels < 1:
            raise ValueError(
                "MLLMConfig.vision_config: the conv stem needs an even patch_size and positive stem_layers and "
                f"stem_channels, got patch_size={config.patch_size}, stem_layers={config.stem_layers}, "
                f"stem_channels={config.stem_channels}"
            )

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """[N, 3, p, L*p] -> [N, C, p/2, L*p/2] (`tgt_sizes` unused: the kernels run on the strip)."""
        return self.layers(pixel_values)


def strip_to_image(strip: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One NaViT strip [C, p, L*p] (h*w real patches, row-major) -> the slice's image [C, h*p, w*p]."""
    c, p = strip.shape[0], strip.shape[1]
    patches = strip[:, :, : h * w * p].reshape(c, p, h, w, p)  # [C, row-in-patch, h, w, col-in-patch]
    return patches.permute(0, 2, 1, 3, 4).reshape(c, h * p, w * p)


def image_to_strip(image: torch.Tensor, h: int, w: int, length: int) -> torch.Tensor:
    """Inverse of `strip_to_image`: [C, h*k, w*k] -> [C, k, length*k], zero-padded after the h*w patches."""
    c, k = image.shape[0], image.shape[1] // h
    strip = image.reshape(c, h, k, w, k).permute(0, 2, 1, 3, 4).reshape(c, k, h * w * k)
    return F.pad(strip, (0, (length - h * w) * k))


class ImageCNNStem(nn.Module):
    """The "cnn" stem: a small strided CNN over each slice's whole image, before the patch convolution.

    The strip is folded back into the slice's image (from its tgt_size), `stem_layers` stride-2 3x3 convolutions
    (GroupNorm, GELU; channels doubling from `stem_channels`) run over it, and the feature map is cut back into the
    strip layout, so the patch convolution of side patch_size / 2**stem_layers still yields one token per patch.
    Why it exists: a ViT trained from scratch on the toy world learned colours at once but shapes hardly at all
    within 500 steps, even with direct supervision, while a 3-layer strided CNN learned them (docs/LOG.md); unlike
    the "conv" stem, these filters see across patch borders.
    """

    torch_default_patch_init = True
    """Whether the patch convolution after this stem keeps PyTorch's fan-in init (see MLLMModel._init_weights)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = config.num_channels
        for i in range(config.stem_layers):
            channels = config.stem_channels * 2**i
            layers += [
                nn.Conv2d(in_channels, channels, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(math.gcd(channels, 8), channels),
                nn.GELU(),
            ]
            in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_channels
        self.input_patch_size = config.patch_size
        self.patch_size = config.patch_size // 2**config.stem_layers
        for layer in self.layers:
            if isinstance(layer, (nn.Conv2d, nn.GroupNorm)):
                # read by MLLMModel._init_weights: PyTorch's fan-in scaled init, not N(0, initializer_range)
                layer.torch_default_init = True

    @staticmethod
    def check_config(config: VisionConfig) -> None:
        """ValueError unless the config can build this stem."""
        if config.stem_layers < 1 or config.stem_channels < 1 or config.patch_size % 2**config.stem_layers:
            raise ValueError(
                "MLLMConfig.vision_config: the cnn stem needs patch_size divisible by 2**stem_layers and positive "
                f"stem_channels, got patch_size={config.patch_size}, stem_layers={config.stem_layers}, "
                f"stem_channels={config.stem_channels}"
            )

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """[N, 3, p, L*p] -> [N, C, k, L*k] with k = p / 2**stem_layers; slices of one size run as one batch."""
        length = pixel_values.shape[-1] // self.input_patch_size
        sizes = [tuple(size) for size in tgt_sizes.tolist()]
        out: list[torch.Tensor | None] = [None] * len(sizes)
        for h, w in sorted(set(sizes)):
            index = [i for i, size in enumerate(sizes) if size == (h, w)]
            images = torch.stack([strip_to_image(pixel_values[i], h, w) for i in index])  # [n, 3, h*p, w*p]
            features = self.layers(images)  # [n, C, h*k, w*k]
            for i, feature in zip(index, features):
                out[i] = image_to_strip(feature, h, w, length)
        return torch.stack(out)
