"""FlexVAR's scale-free positions: one learned 2-D table, area-resized to each scale, on any AdaLN backbone.

VAR learns one absolute position per token of its fixed schedule plus a level embedding per scale; FlexVAR keeps
a (1, C, grid, grid) table, resizes it with `area` (adaptive average pooling) to every scale's size and has no
level embedding (official models/flexvar.py:70-71,147-162,192-196,276-283). So any scale
list, and sizes up to and beyond the grid, run without new parameters: positions and the mask are computed from
the schedule each call is given, as the official forward does from its `infer_patch_nums`.

`ScalePositions` does this for any backbone built like `AdaLNTransformer` (start / embed_scale / forward read
`level_pos(scales)` and `attention_mask(scales, ...)`): `ScaleFreeTransformer` is FlexVAR's backbone (backbone=flexvar);
generators/mvar.py puts the same positions on M-VAR's Mamba blocks (backbone=mvar_flex).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from scalegen.generators.backbone import AdaLNTransformer
from scalegen.schedule.scales import VAR_256, ScaleSchedule, area_down


def sincos_table(grid: int, width: int) -> torch.Tensor:
    """FlexVAR's initial table (1, C, grid, grid): channel 2k = sin(y w_k), channel 2k+1 = cos(x w_k), w_k = 1e4^(-2k/C)."""
    if width % 2:
        raise ValueError(f"the position table needs an even width, got {width}")
    freqs = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * -(math.log(10000.0) / width))
    coords = torch.arange(grid, dtype=torch.float32)
    table = torch.zeros(grid, grid, width)
    table[:, :, 0::2] = torch.sin(coords[:, None, None] * freqs)  # rows
    table[:, :, 1::2] = torch.cos(coords[None, :, None] * freqs)  # columns
    return table.unsqueeze(0).permute(0, 3, 1, 2)  # channels-last strides, as the official parameter (pooling rounds by layout)


class ScalePositions:
    """Mixin over an AdaLNTransformer-like backbone: the 2-D table instead of per-token positions and levels.

    The constructor takes the base's arguments plus `pos_grid`, the table's side (official: 32, twice the largest
    trained scale). `scales` is only the schedule a call without one runs on.
    """

    scale_free = True  # positions are the table resized to whatever schedule a call brings

    def __init__(self, *args, pos_grid: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        del self.pos_embed, self.lvl_embed  # the base's per-token positions and level embedding: not in FlexVAR
        self.pos_embed = nn.Parameter(sincos_table(pos_grid, self.width))
        self.pos_grid = pos_grid

    def level_pos(self, scales: ScaleSchedule) -> torch.Tensor:
        """(1, L, C): the table resized to each scale of `scales`, flattened row-major."""
        return torch.cat([area_down(self.pos_embed, size).flatten(2).transpose(1, 2) for size in scales.sizes], dim=1)

    def resolve_scales(self, scales=None, key: str = "scales") -> ScaleSchedule:
        """Any number of steps, any sizes; only the first scale is fixed, by pos_start."""
        sched = super().resolve_scales(scales, key)
        if sched.token_counts[0] != self.first_l:
            raise ValueError(f"{key}: the first scale must have {self.first_l} token(s), as pos_start; got {sched.sizes[0]}")
        return sched


class ScaleFreeTransformer(ScalePositions, AdaLNTransformer):
    """FlexVAR's transformer: VAR's AdaLN blocks, block-causal over scales, FlexVAR's positions."""

    def __init__(self, num_classes: int = 1000, token_dim: int = 32, scales: Sequence = VAR_256, depth: int = 16,
                 width: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float | None = None, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = True, pos_grid: int = 32, attention: str = "auto"):
        super().__init__(num_classes, token_dim, scales, depth, width, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                         drop_path_rate, norm_eps, shared_aln, attn_l2_norm, attention, pos_grid=pos_grid)
