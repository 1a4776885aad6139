"""The perceiver resampler: 64 learned queries read each slice's vision tokens and become 64 LLM-sized rows.

Keys carry a 2D sin-cos position embedding (so the queries know where a patch sits in its slice); values do not.
Whatever the slice's patch grid, the output is always [query_num, llm_hidden], which is what the prompt reserves
between `<image>`/`<slice>` and its closing tag.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[..., dim]: dim/2 sines then dim/2 cosines of position * omega_k, omega_k = 1 / 10000^(k / (dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000) ** omega  # [dim/2]
    angles = positions[..., None].astype(np.float32) * omega  # [..., dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def sincos_2d(dim: int, height: int, width: int) -> np.ndarray:
    """[height, width, dim] float32: the first half of the channels encodes the column, the second half the row."""
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )
    return np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=-1)


class Resampler(nn.Module):
    """kv_proj -> ln_kv -> cross-attention from ln_q(query) -> ln_post -> @ proj.

    `attn` is torch's `nn.MultiheadAttention`, whose parameter names (in_proj_weight with rows stacked q, k, v;
    out_proj) are exactly the checkpoint's.
    """

    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, max_size: int = 70, eps: float = 1e-6):
        super().__init__()
        num_heads = embed_dim // 128
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(
                f"MLLMConfig.hidden_size ({embed_dim}) must be a positive multiple of 128 for the resampler"
            )
        self.embed_dim = embed_dim
        self.max_size = max_size
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self.register_buffer("pos_embed", self._pos_table(max_size, max_size), persistent=False)

    def _pos_table(self, height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.from_numpy(sincos_2d(self.embed_dim, height, width)).to(device)  # [H, W, D] float32

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent position table (after building on the meta device)."""
        self.pos_embed = self._pos_table(self.max_size, self.max_size, device)

    def _positions(self, tgt_sizes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """[N, L, D]: each slice's [:h, :w] corner of the table, flattened row-major, zero after h*w."""
        max_h, max_w = (int(v) for v in tgt_sizes.max(dim=0).values)
        if max_h > self.pos_embed.shape[0] or max_w > self.pos_embed.shape[1]:
            size = max(max_h, max_w, self.max_size)
            self.pos_embed = self._pos_table(size, size, self.pos_embed.device)  # grow once for huge slices
        pos = torch.zeros(len(tgt_sizes), length, self.embed_dim, dtype=dtype, device=self.pos_embed.device)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos[i, : h * w] = self.pos_embed[:h, :w].reshape(h * w, -1).to(dtype)
        return pos

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """x [N, L, kv_dim] (vision tokens, padded after h*w), tgt_sizes [N, 2] -> [N, query_num, embed_dim]."""
        n, length, _ = x.shape
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(x.device)  # [N]
        padding = torch.arange(length, device=x.device)[None, :] >= lengths[:, None]  # [N, L], True = ignore
        kv = self.ln_kv(self.kv_proj(x))  # [N, L, D]
        pos = self._positions(tgt_sizes, length, kv.dtype).to(x.device)  # [N, L, D]
        q = self.ln_q(self.query)[:, None].expand(-1, n, -1)  # [Q, N, D]: the same queries for every slice
        out, _ = self.attn(
            q, (kv + pos).transpose(0, 1), kv.transpose(0, 1), key_padding_mask=padding, need_weights=False
        )  # [Q, N, D] (sequence-first, as nn.MultiheadAttention wants)
        return self.ln_post(out.transpose(0, 1)) @ self.proj  # [N, Q, D]
