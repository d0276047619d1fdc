"""FlowAR's per-scale flow network (`SimpleTransformerAdaLN`): a small transformer over one scale's tokens.

Input x_t (B, N, C) and the AR output z (B, N, D) at the same positions; output the velocity (B, N, C). Two block
kinds: spatial AdaLN (`Block_v1`, FlowAR-S: modulations from t + c per token) and cross-attention (`Block_v2`,
FlowAR-L/H: time-only AdaLN on self-attention, cross-attention to z, per-token AdaLN on the MLP). Every attention
is bidirectional within the scale with 2D RoPE on the scale's grid. Reference: FlowAR's models/flowmodel.py:291-365.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLU

from scalegen.generators.attention import RMSNorm, modulate
from scalegen.generators.rope import apply_rope, rope_angles, rope_frequencies


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t (B,) -> (B, dim) sinusoids [cos | sin], in fp32 (DiT's, as FlowAR uses it)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimeEmbed(nn.Module):
    """t in [0, 1] -> (B, W). FlowAR truncates t*1000 to an integer first (`(t*1000).long()`), kept here."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        steps = (t.float() * 1000).long()  # the official truncation, on the fp32 time
        with torch.autocast(t.device.type, enabled=False):  # the embedding stays fp32 under mixed precision
            return self.mlp(timestep_embedding(steps, self.freq_dim))


class Attention(nn.Module):
    """Self-attention (kv=None) or cross-attention to kv (B, N, kv_dim) at the same N positions; RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        if kv_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, kv: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys (rotated) and values of kv (B, N, kv_dim): fixed for a scale, so the sampler keeps them."""
        B, N, _ = kv.shape
        k, v = self.kv(kv).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return apply_rope(k, rope), v

    def forward(self, x: torch.Tensor, rope, kv: torch.Tensor | None = None, kv_cached=None) -> torch.Tensor:
        B, N, C = x.shape
        if kv is None and kv_cached is None:
            q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            k = apply_rope(k, rope)
        else:
            q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = kv_cached if kv_cached is not None else self.keys_values(kv, rope)
        q = apply_rope(q, rope)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def _mlp(width: int, mlp_ratio: float) -> SwiGLU:
    return SwiGLU(width, int(width * mlp_ratio * 2 / 3), act_layer=nn.GELU)


class SpatialAdaLNBlock(nn.Module):
    """`Block_v1`: x += g1*attn(norm(x)(1+s1)+b1); x += g2*mlp(norm(x)(1+s2)+b2), mods = Linear(SiLU(t + c)) per token."""

    cross = False  # no cross-attention: nothing of the condition to precompute per scale

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.norm = RMSNorm(width)
        self.attn = Attention(width, num_heads)
        self.mlp = _mlp(width, mlp_ratio)
        self.ada_lin = nn.Linear(width, 6 * width)

    def modulations(self, t, c) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (..., B, N, W): t (..., B or 1, 1, W), c (B, N, W)."""
        return self.ada_lin(F.silu(t + c)).unflatten(-1, (6, self.width)).unbind(-2)

    def forward(self, x, t, c, z, rope, kv_cached=None, mods=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulations(t, c) if mods is None else mods
        x = x + self.attn(modulate(self.norm(x), scale1, shift1), rope).mul_(gamma1)
        return x + self.mlp(modulate(self.norm(x), scale2, shift2)).mul_(gamma2)


class CrossAttnBlock(nn.Module):
    """`Block_v2`: time-modulated self-attention, cross-attention to the AR output z, (t + c)-modulated MLP."""

    cross = True  # its keys/values of z are computed once per scale (FlowNet.context)

    def __init__(self, width: int, num_heads: int, cond_width: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.norm = RMSNorm(width)
        self.attn = Attention(width, num_heads)
        self.crossattn = Attention(width, num_heads, kv_dim=cond_width)
        self.norm2_1, self.norm2_2 = RMSNorm(width, weight=True), RMSNorm(cond_width, weight=True)
        self.mlp = _mlp(width, mlp_ratio)
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def cross_keys_values(self, z: torch.Tensor, rope):
        return self.crossattn.keys_values(self.norm2_2(z), rope)

    def modulations(self, t, c) -> tuple[torch.Tensor, ...]:
        """(gamma1, scale1, shift1) of the self-attention, (..., B or 1, 1, W) from t alone, then (gamma2, scale2,
        shift2) of the MLP, (..., B, N, W): t (..., B or 1, 1, W), c (B, N, W)."""
        attn = self.ada_lin_attn(F.silu(t)).unflatten(-1, (3, self.width)).unbind(-2)
        return attn + self.ada_lin_mlp(F.silu(c + t)).unflatten(-1, (3, self.width)).unbind(-2)

    def forward(self, x, t, c, z, rope, kv_cached=None, mods=None):
        gamma1, scale1, shift1, gamma2, scale2, shift2 = self.modulations(t, c) if mods is None else mods
        x = x + self.attn(modulate(self.norm(x), scale1, shift1), rope).mul_(gamma1)
        kv_cached = kv_cached if kv_cached is not None else self.cross_keys_values(z, rope)
        x = x + self.crossattn(self.norm2_1(x), rope, kv_cached=kv_cached)
        return x + self.mlp(modulate(self.norm(x), scale2, shift2)).mul_(gamma2)


class FinalLayer(nn.Module):
    """norm(x)(1 + scale) + shift -> Linear to the latent channels; (shift, scale) per token from t + c."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulations(self, tc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adaLN_modulation(tc).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, tc: torch.Tensor | None, mods=None) -> torch.Tensor:
        shift, scale = self.modulations(tc) if mods is None else mods
        return self.linear(modulate(self.norm(x), scale, shift))


class FlowNet(nn.Module):
    """velocity(x_t (B,N,C), t (B,), z (B,N,D), hw) -> (B,N,C); `hw` is the scale's token-map size for RoPE."""

    def __init__(self, channels: int, width: int, cond_width: int, depth: int, cross: bool = False,
                 num_heads: int | None = None, mlp_ratio: float = 4.0, time_freq_dim: int = 256,
                 rope_grid: float = 16, zero_init_output: bool = False):
        super().__init__()
        num_heads = num_heads or max(width // 64, 1)  # FlowAR: heads of 64 channels
        if width % num_heads:
            raise ValueError(f"head.flow_width {width} is not divisible by head.num_heads {num_heads}")
        self.channels, self.rope_grid = channels, rope_grid
        self.time_embed = TimeEmbed(width, time_freq_dim)
        self.cond_embed = nn.Linear(cond_width, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(
            CrossAttnBlock(width, num_heads, cond_width, mlp_ratio) if cross else SpatialAdaLNBlock(width, num_heads, mlp_ratio)
            for _ in range(depth))
        self.final_layer = FinalLayer(width, channels)
        self.register_buffer("rope_freqs", rope_frequencies(width // num_heads), persistent=False)
        self._rope_cache: dict = {}
        self.init_weights(zero_init_output)

    @torch.no_grad()
    def init_weights(self, zero_init_output: bool = False) -> None:
        """What the official FlowAR model ends up with: xavier-uniform linears, zero biases (its model-wide init
        runs after the head's own and so undoes the head's zero output layer; `zero_init_output` restores it)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        if zero_init_output:
            self.final_layer.linear.weight.zero_()

    def rope(self, hw: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (hw, device)
        if key not in self._rope_cache:
            # built outside inference mode: a table first made in validation is then saved for backward in training
            with torch.inference_mode(False), torch.no_grad():
                angles = rope_angles(self.rope_freqs.to(device), hw[0], hw[1], self.rope_grid)
                self._rope_cache[key] = (angles.cos(), angles.sin())
        return self._rope_cache[key]

    def context(self, z: torch.Tensor, hw: tuple[int, int]) -> dict:
        """What depends only on the condition z (B, N, D) of a scale: computed once, reused by every ODE step."""
        rope = self.rope(tuple(hw), z.device)
        kv = [blk.cross_keys_values(z, rope) if blk.cross else None for blk in self.res_blocks]
        return {"z": z, "rope": rope, "c": self.cond_embed(z), "kv": kv}

    def modulations(self, t: torch.Tensor, context: dict) -> list:
        """Everything of the network that depends on the time t (..., B) and the condition but not on x: each
        block's AdaLN modulations, then the final layer's, each with t's leading dimensions."""
        t = self.time_embed(t.flatten()).view(*t.shape, 1, -1)  # (..., B, 1, W) against c (B, N, W)
        c = context["c"]
        return [block.modulations(t, c) for block in self.res_blocks] + [self.final_layer.modulations(c + t)]

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, z: torch.Tensor | None,
                hw: tuple[int, int] | None = None, context: dict | None = None, mods: list | None = None) -> torch.Tensor:
        """`mods`: `modulations(t, context)` when already computed (then t is not used)."""
        ctx = context if context is not None else self.context(z, hw)
        mods = self.modulations(t, ctx) if mods is None else mods
        x = self.input_proj(x)
        for block, kv, m in zip(self.res_blocks, ctx["kv"], mods):
            x = block(x, None, None, ctx["z"], ctx["rope"], kv, mods=m)
        return self.final_layer(x, None, mods=mods[-1])


class GridVelocity:
    """velocity(x, t) of a FlowNet for the times of a fixed grid, called in the grid's order (the Euler sampler).

    The AdaLN modulations depend on t and the condition but not on x, so they are computed for `rows // (B*N)`
    grid times at once: one large matrix product per layer instead of one per step, whose few rows (B*N at the
    small scales) would reread the whole weight matrix each step. A t off the grid is computed directly.
    """

    def __init__(self, net: FlowNet, context: dict, times: torch.Tensor, rows: int = 1024):
        self.net, self.context, self.times = net, context, times
        self.values = times.tolist()
        self.group = max(1, rows // context["c"].shape[:-1].numel())
        self.start, self.mods, self.next = 0, [], 0

    def _at(self, j: int) -> list:
        if not self.start <= j < self.start + len(self.mods):
            # (g, B): a time per step and batch row, so the time embedding's product has the rows a step would give it
            t = self.times[j:j + self.group, None].expand(-1, self.context["c"].shape[0])
            per_layer = self.net.modulations(t, self.context)  # layer -> parts, each (g, ...)
            self.start, self.mods = j, [[tuple(p[i] for p in parts) for parts in per_layer] for i in range(len(t))]
        return self.mods[j - self.start]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.next < len(self.values) and bool((t == self.values[self.next]).all()):
            self.next += 1
            return self.net(x, None, None, context=self.context, mods=self._at(self.next - 1))
        return self.net(x, t, None, context=self.context)
