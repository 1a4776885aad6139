"""`PatchMerger` and `TokenProjector`: the `projector="merge"` and `"mlp"` alternatives to the perceiver resampler,
for tiny models trained from scratch.

Why it exists: a from-scratch toy prototype (issue 9's feasibility note) learned shapes and positions with a 2x2
patch merge into 16 image rows; whether the resampler can do the same at that size is open. Measured here on the
randomly initialised toy preset: the resampler's 16 learned queries all read nearly the same average of the
mostly-background patches (their outputs differ by ~6% across queries), whereas each merged row is tied to one region
of the image from the first step. Real MiniCPM-V checkpoints keep `projector="resampler"`.

Each slice's (h, w) token grid is average-pooled to (2s, 2s) when it is not already that size (s = sqrt(query_num)),
then each 2x2 block of tokens is concatenated and projected: LayerNorm -> Linear -> GELU -> Linear.

`TokenProjector` ("mlp", LLaVA-1.5's projector) maps every vision token on its own (the grid pooled to
sqrt(query_num) per side only when it has another size). Why: under direct supervision the toy tower's own tokens
learn the shapes within ~600 steps, while the rows of a 2x2 merge, of a pooled grid or of the resampler do not within
1,000 (docs/LOG.md, 2026-11-27): a row must not mix the features of several tokens before the LLM reads them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def square_grid(tokens: torch.Tensor, h: int, w: int, size: int) -> torch.Tensor:
    """One slice's first h*w tokens [L, D] -> [D, size, size] (average-pooled when the grid is another size)."""
    grid = tokens[: h * w].reshape(h, w, -1).permute(2, 0, 1)  # [D, h, w]
    return grid if (h, w) == (size, size) else F.adaptive_avg_pool2d(grid, size)


class GridProjector(nn.Module):
    """Shared parts of the grid projectors: the square row grid (side = sqrt(query_num)) and the row MLP
    LayerNorm -> Linear -> GELU -> Linear over `in_dim` features per row."""

    name = ""

    def __init__(self, num_queries: int, embed_dim: int, in_dim: int, eps: float = 1e-6):
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(
                f"MLLMConfig.query_num must be a perfect square for projector '{self.name}', got {num_queries}"
            )
        self.side = side
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.fc1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def mlp(self, rows: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(rows))))


class PatchMerger(GridProjector):
    """Vision tokens [N, L, kv_dim] of slices with grids tgt_sizes [N, 2] -> [N, query_num, embed_dim]."""

    name = "merge"

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(num_queries, embed_dim, 4 * kv_dim, eps)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        size = 2 * self.side
        grids = torch.stack(
            [square_grid(x[i], int(h), int(w), size) for i, (h, w) in enumerate(tgt_sizes.tolist())]
        )  # [N, D, 2s, 2s]
        n, dim, s = len(grids), grids.shape[1], self.side
        blocks = grids.reshape(n, dim, s, 2, s, 2).permute(0, 2, 4, 3, 5, 1)  # [N, s, s, 2, 2, D]
        merged = blocks.reshape(
            n, s * s, 4 * dim
        )  # row-major blocks, each [top-left, top-right, bottom-left, ...]
        return self.mlp(merged)


class TokenProjector(GridProjector):
    """Vision tokens [N, L, kv_dim] of slices with grids tgt_sizes [N, 2] -> [N, query_num, embed_dim], one row per
    token of the (pooled to sqrt(query_num) x sqrt(query_num)) grid: LayerNorm -> Linear -> GELU -> Linear."""

    name = "mlp"

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__(num_queries, embed_dim, kv_dim, eps)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        grids = torch.stack(
            [square_grid(x[i], int(h), int(w), self.side) for i, (h, w) in enumerate(tgt_sizes.tolist())]
        )  # [N, D, s, s]
        tokens = grids.flatten(2).transpose(1, 2)  # [N, s*s, D], row-major
        return self.mlp(tokens)
