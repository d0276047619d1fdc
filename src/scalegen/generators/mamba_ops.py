"""Two elementwise stretches of Mamba2, each one autograd node with its backward written out: the causal depthwise
conv + SiLU before the scan, and the gated RMSNorm after it.

Left to autograd, each saved every intermediate at (batch, length, 2-4k channels) and ran its backward as a chain of
separate passes: the conv through a transposed, zero-padded copy and a grouped-conv backward that is slow on CPU,
the norm through five saved products. Here each saves its inputs only (and the norm its per-row scale), recomputes
the cheap rest in backward, and works in the (batch, length, channels) layout the projections use, so no transposed
copy is made. The forward arithmetic is the modules' own, term for term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _dsilu(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))


def _conv(xpad: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, length: int) -> torch.Tensor:
    """sum_k wt[k] * xpad[:, t + k] (+ bias) over xpad (b, length + taps - 1, c), wt (taps, c) -> (b, length, c)."""
    out = xpad[:, :length] * wt[0]
    for k in range(1, wt.shape[0]):
        out.addcmul_(xpad[:, k:k + length], wt[k])
    return out if bias is None else out.add_(bias)


class CausalConvSiLU(torch.autograd.Function):
    """SiLU(causal depthwise conv1d) over x (b, l, c) continuing from `prev` (b, taps - 1, c): Mamba2's conv1d with
    weight (c, taps) and its bias, computed in x's dtype (as autocast ran the conv). Saves the padded input only;
    the pre-activation is recomputed in backward."""

    @staticmethod
    def forward(ctx, x, prev, weight, bias):
        xpad = torch.cat((prev.to(x.dtype), x), dim=1)
        wt = weight.t().to(x.dtype).contiguous()
        bias_x = None if bias is None else bias.to(x.dtype)
        ctx.save_for_backward(xpad, wt, bias_x)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return F.silu(_conv(xpad, wt, bias_x, x.shape[1]))

    @staticmethod
    def backward(ctx, grad):
        xpad, wt, bias = ctx.saved_tensors
        length, taps = grad.shape[1], wt.shape[0]
        du = grad * _dsilu(_conv(xpad, wt, bias, length))
        dxpad = torch.zeros_like(xpad)
        dwt = torch.empty_like(wt)
        for k in range(taps):
            dxpad[:, k:k + length].addcmul_(du, wt[k])
            dwt[k] = (du * xpad[:, k:k + length]).sum(dim=(0, 1))
        dbias = None if bias is None else du.sum(dim=(0, 1)).to(ctx.dtypes[1])
        return dxpad[:, taps - 1:], dxpad[:, :taps - 1], dwt.t().to(ctx.dtypes[0]), dbias


class GatedRMSNormFn(torch.autograd.Function):
    """RMSNorm(y * SiLU(z)) * weight over groups of `group` channels, in float32 at least (bf16 inputs are promoted);
    saves y, z and each row's 1/rms."""

    @staticmethod
    def forward(ctx, y, z, weight, eps: float, group: int):
        ctx.compute = torch.promote_types(y.dtype, torch.float32)
        g = y.to(ctx.compute) * F.silu(z.to(ctx.compute))
        groups = g.view(*g.shape[:-1], -1, group)
        rstd = torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(y, z, weight, rstd)
        ctx.group = group
        return (groups * rstd).view(g.shape) * weight.to(ctx.compute)

    @staticmethod
    def backward(ctx, grad):
        y, z, weight, rstd = ctx.saved_tensors
        yf, zf, grad = y.to(ctx.compute), z.to(ctx.compute), grad.to(ctx.compute)
        silu_z = F.silu(zf)
        g = (yf * silu_z).view(*yf.shape[:-1], -1, ctx.group)
        n = g * rstd  # the normalised rows
        dn = (grad * weight.to(ctx.compute)).view(g.shape)
        dweight = (grad * n.view(grad.shape)).flatten(0, -2).sum(0)
        dg = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).view(yf.shape)
        dy = (dg * silu_z).to(y.dtype)
        dz = (dg * yf * _dsilu(zf)).to(z.dtype)
        return dy, dz, dweight.to(weight.dtype), None, None
