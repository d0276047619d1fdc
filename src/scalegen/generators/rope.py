"""2D rotary position embedding laid per scale on one common grid (FlowAR's `VisionRotaryEmbeddingFast`).

Each scale's h x w tokens sit at positions `i / h * grid` (rows) and `j / w * grid` (columns), so every scale covers
the same grid (FlowAR hard-codes grid 16: scale 2 at {0, 8}, scale 4 at {0, 4, 8, 12}). The first half of a head's
channels rotates with the row, the second half with the column; pairs are adjacent channels (GPT-J style).
Reference: FlowAR's models/rope.py and flowar.py:164-449.
"""
from __future__ import annotations

from typing import Sequence

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(head_dim // 4,) inverse frequencies: each axis gets half of the head, and each frequency a channel pair."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


def rope_angles(freqs: torch.Tensor, h: int, w: int, grid: float = 16) -> torch.Tensor:
    """(h*w, head_dim) rotation angles of an h x w token map, row-major, on a `grid`-wide common lattice."""
    rows = torch.arange(h, device=freqs.device) / h * grid
    cols = torch.arange(w, device=freqs.device) / w * grid
    fr = (rows[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (h, head_dim/2), pairs share a frequency
    fc = (cols[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
    return torch.cat((fr[:, None, :].expand(h, w, -1), fc[None, :, :].expand(h, w, -1)), dim=-1).reshape(h * w, -1)


def rope_table(head_dim: int, sizes: Sequence[tuple[int, int]], grid: float = 16,
               theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (sum h*w, head_dim), of every scale in order: each scale on its own h x w grid."""
    freqs = rope_frequencies(head_dim, theta)
    angles = torch.cat([rope_angles(freqs, h, w, grid) for h, w in sizes])
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (..., N, head_dim) rotated by the (N, head_dim) cos/sin tables; computed in fp32, returned in x's dtype."""
    cos, sin = rope
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).to(x.dtype)
