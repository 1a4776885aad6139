"""`PatchMerger`: the `projector="merge"` alternative to the perceiver resampler, for tiny models trained from scratch.

Why it exists: a from-scratch toy prototype (issue 9's feasibility note) learned shapes and positions with a 2x2
patch merge into 16 image rows; whether the resampler can do the same at that size is open. Measured here on the
randomly initialised toy preset: the resampler's 16 learned queries all read nearly the same average of the
mostly-background patches (their outputs differ by ~6% across queries), whereas each merged row is tied to one region
of the image from the first step. Real MiniCPM-V checkpoints keep `projector="resampler"`.

Each slice's (h, w) token grid is average-pooled to (2s, 2s) when it is not already that size (s = sqrt(query_num)),
then each 2x2 block of tokens is concatenated and projected: LayerNorm -> Linear -> GELU -> Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchMerger(nn.Module):
    """Vision tokens [N, L, kv_dim] of slices with grids tgt_sizes [N, 2] -> [N, query_num, embed_dim]."""

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        side = math.isqrt(num_queries)
        if side * side != num_queries:
            raise ValueError(
                f"MLLMConfig.query_num must be a perfect square for projector 'merge', got {num_queries}"
            )
        self.side = side
        self.norm = nn.LayerNorm(4 * kv_dim, eps=eps)
        self.fc1 = nn.Linear(4 * kv_dim, embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(embed_dim, embed_dim)

    def grid(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """One slice's first h*w tokens [L, D] -> [D, 2s, 2s] (pooled when the grid is another size)."""
        grid = tokens[: h * w].reshape(h, w, -1).permute(2, 0, 1)  # [D, h, w]
        size = 2 * self.side
        return grid if (h, w) == (size, size) else F.adaptive_avg_pool2d(grid, size)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        grids = torch.stack([self.grid(x[i], int(h), int(w)) for i, (h, w) in enumerate(tgt_sizes.tolist())])
        n, dim, s = len(grids), grids.shape[1], self.side
        blocks = grids.reshape(n, dim, s, 2, s, 2).permute(0, 2, 4, 3, 5, 1)  # [N, s, s, 2, 2, D]
        merged = blocks.reshape(
            n, s * s, 4 * dim
        )  # row-major blocks, each [top-left, top-right, bottom-left, ...]
        return self.fc2(self.act(self.fc1(self.norm(merged))))
