"""The vision tower (`vpm`): SigLIP as a NaViT, i.e. one ViT over slices of different aspect ratios.

Each slice arrives as a strip [3, 14, n_patches * 14] (its 14x14 patches side by side, row-major), zero-padded to the
longest strip of the batch. A stride-14 convolution turns the strip into n_patches tokens. Every slice, whatever its
grid (h, w), is mapped onto the same 70x70 learned position table by bucketing its fractional patch coordinates, so a
32x32 slice and an 18x58 slice both span the whole table. Padded patches are masked out of attention as keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from mllm.model.config import VisionConfig
from mllm.model.llm import additive_mask, eager_attention
from mllm.model.registry import PATCH_STEM, stem_class


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


def pad_strips(strips: list[torch.Tensor]) -> torch.Tensor:
    """Stack [3, 14, L_i] strips into [N, 3, 14, max L], zero-padded on the right (padded patches are masked)."""
    width = max(s.shape[-1] for s in strips)
    out = strips[0].new_zeros(len(strips), *strips[0].shape[:-1], width)
    for i, strip in enumerate(strips):
        out[i, ..., : strip.shape[-1]] = strip
    return out


class VisionEmbeddings(nn.Module):
    """Patch conv (optionally after a registered stem, see `VisionConfig.stem`) + bucketed position embedding."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.side = config.num_patches_per_side
        if config.stem == PATCH_STEM:
            self.stem = None
            in_channels, kernel = config.num_channels, config.patch_size
        else:  # a registered from-scratch option (mllm.model.registry), e.g. the toy world's "conv" / "cnn"
            self.stem = stem_class(config.stem)(config)
            in_channels, kernel = self.stem.out_channels, self.stem.patch_size
        self.patch_embedding = nn.Conv2d(in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)
        self.patch_embedding.torch_default_init = getattr(self.stem, "torch_default_patch_init", False)
        self.position_embedding = nn.Embedding(self.side**2, config.hidden_size)
        # read by MLLMModel._init_weights (None: the usual initializer_range)
        self.position_embedding.position_init_std = config.position_init_std

    def forward(
        self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [N, 3, 14, L*14] -> (tokens [N, L, D], position ids [N, L])."""
        weight = self.patch_embedding.weight
        pixel_values = pixel_values.to(weight.dtype)
        if self.stem is not None:
            pixel_values = self.stem(pixel_values, tgt_sizes)  # [N, C, k, L*k]
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
