"""LlamaGen's VQ-16 encoder/decoder (FlexVAR's FlexVAE): the LDM topology of blocks.py in LlamaGen's layout.

Same computation as `blocks.Encoder/Decoder` (ResNet blocks, attention at the coarsest level and in the middle,
asymmetric-pad stride-2 downsampling, nearest x2 upsampling); what differs is the module layout, and so the
state-dict names: `conv_blocks.{level}.res.{i}` / `.attn.{i}` with separate 1x1 `q`, `k`, `v` convs, `mid.{0,1,2}`,
and the decoder's levels stored coarse first. Keeping LlamaGen's names makes FlexVAE.pth load by identity.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scalegen.tokenizers.blocks import (
    AttnBlockQKV,
    Downsample,
    ResnetBlock as _ResnetBlock,
    Upsample,
    group_norm,
    residual,
)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written out as LlamaGen does: F.silu rounds differently (1e-6 on the latent). Into the
    sigmoid's buffer where autograd keeps nothing (the same products; see blocks.silu for why)."""
    return x * torch.sigmoid(x) if torch.is_grad_enabled() else torch.sigmoid(x).mul_(x)


class ResnetBlock(_ResnetBlock):
    """blocks.ResnetBlock (same parameters) with LlamaGen's swish."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return residual(self.nin_shortcut(x), h)


def _level(res: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    return level


def _mid(channels: int, dropout: float, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, dropout, groups), AttnBlockQKV(channels, groups),
                          ResnetBlock(channels, channels, dropout, groups)])


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class LlamaGenEncoder(nn.Module):
    """image (B,3,H,W) -> (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, in_channels: int = 3, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(width, ch * mult, dropout, norm_groups))
                width = ch * mult
                if last:  # attention after every block of the coarsest level only
                    attn.append(AttnBlockQKV(width, norm_groups))
            level = _level(res, attn)
            if not last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
        self.mid = _mid(width, dropout, norm_groups)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class LlamaGenDecoder(nn.Module):
    """(B, z_channels, h, w) -> image (B,3,h*f,w*f), unbounded. `conv_blocks.0` is the coarsest level."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, out_channels: int = 3, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid(width, dropout, norm_groups)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(width, ch * ch_mult[i], dropout, norm_groups))
                width = ch * ch_mult[i]
                if i == len(ch_mult) - 1:
                    attn.append(AttnBlockQKV(width, norm_groups))
            level = _level(res, attn)
            if i != 0:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
