"""The vision tower (`vpm`): SigLIP as a NaViT, i.e. one ViT over slices of different aspect ratios.

Each slice arrives as a strip [3, 14, n_patches * 14] (its 14x14 patches side by side, row-major), zero-padded to the
longest strip of the batch. A stride-14 convolution turns the strip into n_patches tokens. Every slice, whatever its
grid (h, w), is mapped onto the same 70x70 learned position table by bucketing its fractional patch coordinates, so a
32x32 slice and an 18x58 slice both span the whole table. Padded patches are masked out of attention as keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mllm.model.config import VisionConfig
from mllm.model.llm import additive_mask, eager_attention


def navit_position_ids(tgt_sizes: torch.Tensor, num_patches: int, side: int) -> torch.Tensor:
    """Position-table ids [N, num_patches] for slices of (h, w) patches; padded patches get id 0.

    Patch (r, c) of an h x w slice sits at fraction (r/h, c/w) of the image; bucketing those fractions on a grid of
    `side` cells gives its row and column in the table. The arithmetic mirrors the reference in float32 so the ids
    match exactly at bucket edges.
    """
    boundaries = torch.arange(1 / side, 1.0, 1 / side)  # [side - 1]
    position_ids = torch.zeros(len(tgt_sizes), num_patches, dtype=torch.long)
    for i, (h, w) in enumerate(tgt_sizes.to("cpu", torch.int32)):  # one small loop over slices, not patches
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)  # [h]
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)  # [w]
        position_ids[i, : int(h) * int(w)] = (rows[:, None] * side + cols[None, :]).flatten()
    return position_ids.to(tgt_sizes.device)


class ConvStem(nn.Module):
    """The optional "conv" stem: 3x3 convolutions (the first with stride 2) with GroupNorm and GELU.

    It runs on the patch strip itself, so the NaViT layout is untouched: a stride-2 convolution maps each p x p patch
    to a (p/2) x (p/2) cell exactly (p even), and the patch convolution of side p/2 that follows yields one token per
    patch. Horizontal neighbours in a strip are the patch's neighbours in its image row, so the 3x3 kernels also see
    a little across patch borders. Why it exists: a linear patch embedding trained from scratch learns colours fast
    but localises objects inside a patch slowly; a few non-linear filters first make edges explicit.
    """

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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, p, L*p] -> [N, C, p/2, L*p/2]."""
        return self.layers(pixel_values)


def pad_strips(strips: list[torch.Tensor]) -> torch.Tensor:
    """Stack [3, 14, L_i] strips into [N, 3, 14, max L], zero-padded on the right (padded patches are masked)."""
    width = max(s.shape[-1] for s in strips)
    out = strips[0].new_zeros(len(strips), *strips[0].shape[:-1], width)
    for i, strip in enumerate(strips):
        out[i, ..., : strip.shape[-1]] = strip
    return out


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
    """The optional "cnn" stem: a small strided CNN over each slice's whole image, before the patch convolution.

    The strip is folded back into the slice's image (from its tgt_size), `stem_layers` stride-2 3x3 convolutions
    (GroupNorm, GELU; channels doubling from `stem_channels`) run over it, and the feature map is cut back into the
    strip layout, so the patch convolution of side patch_size / 2**stem_layers still yields one token per patch.
    Why it exists: a ViT trained from scratch on the toy world learned colours at once but shapes hardly at all
    within 500 steps, even with direct supervision, while a 3-layer strided CNN learned them (docs/LOG.md); unlike
    the "conv" stem, these filters see across patch borders.
    """

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
        self.patch_size = config.patch_size
        for layer in self.layers:
            if isinstance(layer, (nn.Conv2d, nn.GroupNorm)):
                # read by MLLMModel._init_weights: PyTorch's fan-in scaled init, not N(0, initializer_range)
                layer.torch_default_init = True

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """[N, 3, p, L*p] -> [N, C, k, L*k] with k = p / 2**stem_layers; slices of one size run as one batch."""
        length = pixel_values.shape[-1] // self.patch_size
        sizes = [tuple(size) for size in tgt_sizes.tolist()]
        out: list[torch.Tensor | None] = [None] * len(sizes)
        for h, w in sorted(set(sizes)):
            index = [i for i, size in enumerate(sizes) if size == (h, w)]
            images = torch.stack([strip_to_image(pixel_values[i], h, w) for i in index])  # [n, 3, h*p, w*p]
            features = self.layers(images)  # [n, C, h*k, w*k]
            for i, feature in zip(index, features):
                out[i] = image_to_strip(feature, h, w, length)
        return torch.stack(out)


class VisionEmbeddings(nn.Module):
    """Patch conv (optionally after a conv stem, see `VisionConfig.stem`) + bucketed position embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.side = config.num_patches_per_side
        if config.stem == "conv":
            self.stem = ConvStem(config)
            in_channels, kernel = config.stem_channels, config.patch_size // 2
        elif config.stem == "cnn":
            self.stem = ImageCNNStem(config)
            in_channels, kernel = self.stem.out_channels, config.patch_size // 2**config.stem_layers
        else:
            self.stem = None
            in_channels, kernel = config.num_channels, config.patch_size
        self.patch_embedding = nn.Conv2d(in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)
        self.patch_embedding.torch_default_init = config.stem == "cnn"
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)
        # read by MLLMModel._init_weights (None: the usual initializer_range)
        self.position_embedding.position_init_std = config.position_init_std

    def forward(
        self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [N, 3, 14, L*14] -> (tokens [N, L, D], position ids [N, L])."""
        weight = self.patch_embedding.weight
        pixel_values = pixel_values.to(weight.dtype)
        if isinstance(self.stem, ImageCNNStem):
            pixel_values = self.stem(pixel_values, tgt_sizes)  # [N, C, k, L*k]
        elif self.stem is not None:
            pixel_values = self.stem(pixel_values)  # [N, C, 7, L*7]
        patches = self.patch_embedding(pixel_values)  # [N, D, 1, L]
        tokens = patches.flatten(2).transpose(1, 2)  # [N, L, D]
        position_ids = navit_position_ids(tgt_sizes, tokens.shape[1], self.side).to(tokens.device)
        return tokens + self.position_embedding(position_ids), position_ids


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention; `bias` [N, 1, 1, L] blocks padded keys."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # [N, h, L, d]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        n, length, dim = x.shape  # [N, L, D]
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        dropout = self.dropout if self.training else 0.0
        if backend == "eager":
            out = eager_attention(q, k, v, bias, dropout)  # [N, h, L, d]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias, backend)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(num_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = self._gradient_checkpointing_func(layer.__call__, x, bias, backend)  # set by transformers
            else:
                x = layer(x, bias, backend)
        return x


class VisionTransformer(nn.Module):
    """`vpm`: embeddings -> encoder -> post_layernorm. `num_layers` excludes a dropped last layer."""

    def __init__(self, config: VisionConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config, num_layers)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor,
        tgt_sizes: torch.Tensor,
        attn_implementation: str | None = "sdpa",
    ) -> torch.Tensor:
        """pixel_values [N, 3, 14, L*14], patch_attention_mask [N, 1, L] (True = real patch), tgt_sizes [N, 2]
        -> last hidden state [N, L, D]. Rows of padded patches are meaningless. `attn_implementation` "eager" is the
        explicit softmax; anything else (sdpa, or flash_attention_2 chosen for the LLM) uses torch's SDPA."""
        backend = "eager" if attn_implementation == "eager" else "sdpa"
        x, _ = self.embeddings(pixel_values, tgt_sizes)  # [N, L, D]
        bias = None
        if not bool(patch_attention_mask.all()):  # only when some slice is padded, as in the reference
            keep = patch_attention_mask.reshape(x.shape[0], 1, 1, x.shape[1])  # [N, 1, 1, L]: per key
            bias = additive_mask(keep, x.dtype)
        return self.post_layernorm(self.encoder(x, bias, backend))

    def encode_strips(
        self,
        strips: list[torch.Tensor],
        tgt_sizes: torch.Tensor,
        attn_implementation: str | None = "sdpa",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Slices as a list of strips [3, p, L_i*p] with grids tgt_sizes [N, 2] -> tokens [N, max L, D] (rows past a
        slice's h*w are padding), the tower run on `chunk_size` slices at a time (all at once when None)."""
        param = self.embeddings.patch_embedding.weight
        pixels = pad_strips([s.to(param.device, param.dtype) for s in strips])  # [N, 3, p, Lmax*p]
        tgt_sizes = tgt_sizes.to(param.device, torch.int32)
        num_patches = pixels.shape[-1] // self.config.patch_size
        lengths = tgt_sizes[:, 0] * tgt_sizes[:, 1]  # [N]
        if int(lengths.max()) != num_patches:
            raise ValueError(
                f"tgt_sizes say the longest slice has {int(lengths.max())} patches but the longest pixel_values strip "
                f"has {num_patches}"
            )
        patch_mask = (torch.arange(num_patches, device=param.device)[None] < lengths[:, None])[
            :, None
        ]  # [N, 1, L]
        step = chunk_size or len(pixels)
        chunks = [
            self(pixels[i : i + step], patch_mask[i : i + step], tgt_sizes[i : i + step], attn_implementation)
            for i in range(0, len(pixels), step)
        ]
        return torch.cat(chunks)  # [N, L, D]
