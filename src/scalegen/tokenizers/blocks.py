"""Convolutional encoder/decoder shared by the VQ tokenizers (the LDM 'vq-f16' topology VAR uses).

Parameter names follow the official VAR VQVAE (`encoder.down.{level}.block.{i}...`) so the converter's table is
short. The attention block keeps VAR's single fused 1x1 `qkv` conv with channels ordered [q | k | v]; `AttnBlockQKV`
is the same attention with LDM's separate q/k/v convs (the KL and LlamaGen tokenizers' names).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def silu(h: torch.Tensor) -> torch.Tensor:
    """F.silu, in place on `h` (a fresh norm output) where autograd keeps nothing: each fresh map above 32 MB (glibc's
    largest mmap threshold; 128 x 256^2 floats) is a new mmap whose page faults cost as much as the op itself."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


def residual(shortcut: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """shortcut + h (the same rounding either way), into h where autograd keeps nothing."""
    return shortcut + h if torch.is_grad_enabled() else h.add_(shortcut)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 projection only where the width changes, as in the checkpoints (`nin_shortcut`)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(self.dropout(silu(self.norm2(h))))
        return residual(self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # (B, HW_q, HW_k); bmm order as in the official block so the encoder output matches to float rounding
        weights = torch.bmm(q.transpose(1, 2).contiguous(), k.contiguous()).mul_(C**-0.5).softmax(dim=2)
        h = torch.bmm(v.contiguous(), weights.transpose(1, 2).contiguous()).view(B, C, H, W)
        return x + self.proj_out(h)


class AttnBlockQKV(nn.Module):
    """AttnBlock with LDM's separate 1x1 `q`, `k`, `v` convs, the names of MAR's KL VAE and LlamaGen's VQ (FlexVAE)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(B, C, H * W) for f in (self.q, self.k, self.v))
        # the official bmm order: (B, HW_q, HW_k) weights, then v @ weights^T
        weights = torch.bmm(q.permute(0, 2, 1), k).mul(C**-0.5).softmax(dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only (LDM)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float, groups: int, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class Encoder(nn.Module):
    """image (B,3,H,W) -> features (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True,
                 using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, dropout, norm_groups))
                width = ch * mult
                if last and using_sa:  # attention after every block of the coarsest level only
                    attns.append(AttnBlock(width, norm_groups))
            level = _level(blocks, attns)
            if not last:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = _mid(width, dropout, norm_groups, using_mid_sa)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latent (B, z_channels, h, w) -> image (B,3,h*f,w*f), unbounded (callers clamp)."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True,
                 using_mid_sa: bool = True, norm_groups: int = 32):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid(width, dropout, norm_groups, using_mid_sa)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built coarse to fine, stored by level index (`up.0` is finest)
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * ch_mult[i], dropout, norm_groups))
                width = ch * ch_mult[i]
                if i == len(ch_mult) - 1 and using_sa:
                    attns.append(AttnBlock(width, norm_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(width)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(silu(self.norm_out(h)))
