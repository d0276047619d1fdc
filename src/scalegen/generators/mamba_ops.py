"""Mamba2's PyTorch path (the CPU one), each piece one autograd node with its backward written out: the causal
depthwise conv + SiLU before the scan, the SSD chunk scan, and the gated RMSNorm after it.

Left to autograd, each saved every intermediate: the conv a transposed, zero-padded copy (and its grouped-conv
backward is slow on CPU), the norm five (batch, length, 2k) products, the scan every chunk's (q x q) decay, mix and
products (~80 MB per M-VAR-d16 layer at batch 2). Here each saves its inputs only (the norm also its per-row scale,
the scan the state entering each chunk) and recomputes the rest in backward; the conv and the norm work in the
(batch, length, channels) layout the projections use. The forward arithmetic is term for term what it was.
"""
from __future__ import annotations

import math

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
    saves y, z and each row's 1/rms when `keep` (grad mode on at the call: nothing is saved while sampling)."""

    @staticmethod
    def forward(ctx, y, z, weight, eps: float, group: int, keep: bool):
        ctx.compute = torch.promote_types(y.dtype, torch.float32)
        g = y.to(ctx.compute) * F.silu(z.to(ctx.compute))
        groups = g.view(*g.shape[:-1], -1, group)
        rstd = torch.rsqrt(groups.square().mean(-1, keepdim=True) + eps)
        if keep:  # z is a slice of in_proj's output: a contiguous copy lets the rest of that (b, l, 4k) tensor go
            ctx.save_for_backward(y, z.contiguous(), weight, rstd)
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
        return dy, dz, dweight.to(weight.dtype), None, None, None


# ---- the SSD scan --------------------------------------------------------------------------------------------------


def _terms(dt, dA, B, C, causal, strict):
    """What a chunk's outputs and gradients share: decay (b, h, q, q), CB (b, g, q, q), mix = decay * dt_s * CB,
    exp(cum dA) (b, h, q) and each token's weight in the state leaving the chunk (b, h, q)."""
    b, h, q = dt.shape
    g = B.shape[1]
    # seg[t, s] = sum_{s<k<=t} dA_k, summed per segment (not cum_t - cum_s, which cancels badly in float32)
    seg = dA.unsqueeze(-1).expand(b, h, q, q).masked_fill(~strict[:q, :q], 0).cumsum(dim=-2)
    decay = seg.masked_fill(~causal[:q, :q], -math.inf).exp()  # zero above the diagonal
    CB = C @ B.transpose(-1, -2)  # shared by the group's heads
    mix = ((decay * dt.unsqueeze(-2)).view(b, g, h // g, q, q) * CB.unsqueeze(2)).view(b, h, q, q)
    return decay, CB, mix, dA.cumsum(dim=-1).exp(), decay[:, :, -1] * dt


def _carried(C, state, h):
    """(C_t . h) per head: C (b, g, q, n), state (b, h, p, n) -> (b, h, q, p)."""
    b, g, q, n = C.shape
    p = state.shape[2]
    carried = C @ state.reshape(b, g, h // g * p, n).transpose(-1, -2)  # (b, g, q, heads of the group x p)
    return carried.view(b, g, q, h // g, p).transpose(2, 3).reshape(b, h, q, p)


def _chunk(x, dt, dA, B, C, state, causal, strict):
    """One chunk of the scan in float32: x (b, h, q, p), dt and dA (b, h, q), B and C (b, g, q, n), the state
    entering it (b, h, p, n). -> y (b, h, q, p) and the state leaving it."""
    b, h, q, p = x.shape
    g, n = B.shape[1], B.shape[-1]
    decay, CB, mix, ecum, weight = _terms(dt, dA, B, C, causal, strict)
    # within the chunk, then from the state entering it: y_t += exp(cum_t) h C_t
    y = mix @ x + _carried(C, state, h) * ecum.unsqueeze(-1)
    # the state leaving: decayed old state + sum_s exp(seg[end, s]) dt_s x_s B_s^T
    added = ((x.transpose(-1, -2) * weight.unsqueeze(-2)).view(b, g, h // g * p, q) @ B).view(b, h, p, n)
    return y, state * ecum[:, :, -1:].unsqueeze(-1) + added


def _group_sum(t: torch.Tensor, g: int) -> torch.Tensor:
    """(b, h, ...) -> (b, g, ...): the sum over the heads of each group (contiguous, as in mamba-ssm)."""
    return t.view(t.shape[0], g, t.shape[1] // g, *t.shape[2:]).sum(2)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(b, g, ...) -> (b, h, ...): each group's tensor for each of its heads (a view)."""
    b, g = t.shape[:2]
    return t.unsqueeze(2).expand(b, g, h // g, *t.shape[2:]).reshape(b, h, *t.shape[2:])


class SSDScan(torch.autograd.Function):
    """The chunked scan, saving only its inputs and the state entering each chunk (a few MB per layer, where autograd
    kept every chunk's (q x q) decay, mix and products: 80 MB per M-VAR-d16 layer at batch 2). The backward
    recomputes one chunk at a time, last to first, carrying the state's gradient back through the chunks."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, chunk: int, keep: bool):
        b, l, h, p = x.shape
        n = B.shape[-1]
        xs = x.float().permute(0, 2, 1, 3)  # (b, h, l, p)
        dts = dt.float().transpose(1, 2)  # (b, h, l)
        Bs, Cs = B.float().permute(0, 2, 1, 3), C.float().permute(0, 2, 1, 3)  # (b, g, l, n)
        dA = dts * A.float().view(1, h, 1)
        state = xs.new_zeros(b, h, p, n) if initial_state is None else initial_state.float()
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
        strict = causal.tril(-1)
        ys, entering = [], []
        for start in range(0, l, chunk):
            end = min(start + chunk, l)
            entering.append(state)
            y, state = _chunk(xs[:, :, start:end], dts[:, :, start:end], dA[:, :, start:end], Bs[:, :, start:end],
                                 Cs[:, :, start:end], state, causal, strict)
            ys.append(y)
        if keep:  # grad mode was on at the call (not while sampling)
            ctx.save_for_backward(x, dt, A, B, C, torch.stack(entering))
        ctx.chunk, ctx.has_initial = chunk, initial_state is not None
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return torch.cat(ys, dim=2).transpose(1, 2), state

    @staticmethod
    def backward(ctx, dy, dstate):
        x, dt, A, B, C, entering = ctx.saved_tensors
        b, l, h, p = x.shape
        g, n = B.shape[-2:]
        chunk = ctx.chunk
        xs, dts = x.float().permute(0, 2, 1, 3), dt.float().transpose(1, 2)
        Bs, Cs = B.float().permute(0, 2, 1, 3), C.float().permute(0, 2, 1, 3)
        Af = A.float().view(1, h, 1)
        dA = dts * Af
        dys = (dy.float() if dy is not None else x.new_zeros(b, l, h, p, dtype=torch.float32)).permute(0, 2, 1, 3)
        dS = dstate.float() if dstate is not None else xs.new_zeros(b, h, p, n)
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
        strict = causal.tril(-1)
        dx, ddt = torch.empty_like(xs), torch.empty_like(dts)
        dB, dC = torch.empty_like(Bs), torch.empty_like(Cs)
        dAparam = xs.new_zeros(h)
        starts = list(range(0, l, chunk))
        for i in reversed(range(len(starts))):
            s0, s1 = starts[i], min(starts[i] + chunk, l)
            xk, dtk, Bk, Ck, S0 = xs[:, :, s0:s1], dts[:, :, s0:s1], Bs[:, :, s0:s1], Cs[:, :, s0:s1], entering[i]
            decay, CB, mix, ecum, weight = _terms(dtk, dA[:, :, s0:s1], Bk, Ck, causal, strict)
            carried = _carried(Ck, S0, h)
            dyk = dys[:, :, s0:s1]
            # within the chunk: y = mix @ x
            dmix = dyk @ xk.transpose(-1, -2)  # (b, h, q, q)
            dxk = mix.transpose(-1, -2) @ dyk
            dmix_decay = dmix * decay
            dCB = _group_sum(dmix_decay * dtk.unsqueeze(-2), g)
            CBh = _heads(CB, h)
            ddtk = (dmix_decay * CBh).sum(-2)  # over t, per s
            dseg = dmix * mix  # d decay * decay; zero above the diagonal
            dcum = dseg.sum(-1) - dseg.sum(-2)  # seg[t, s] = cum_t - cum_s in its derivative
            dCk = dCB @ Bk
            dBk = dCB.transpose(-1, -2) @ Ck
            # the carried state: y_t += exp(cum_t) (S0 C_t)
            dcarried = dyk * ecum.unsqueeze(-1)  # (b, h, q, p)
            dcum = dcum + (dyk * carried).sum(-1) * ecum
            dS0 = (dcarried.transpose(-1, -2) @ _heads(Ck, h))  # (b, h, p, n)
            dCk = dCk + _group_sum(dcarried @ S0, g)
            # the state leaving: S = exp(cum_Q) S0 + sum_s weight_s x_s B_s^T
            eQ = ecum[:, :, -1]
            dS0 = dS0 + dS * eQ[..., None, None]
            dcum[:, :, -1] += eQ * (S0 * dS).sum((-1, -2))
            dSB = _heads(Bk, h) @ dS.transpose(-1, -2)  # (b, h, q, p): dS B_s per token
            dxk = dxk + dSB * weight.unsqueeze(-1)
            dBk = dBk + _group_sum((xk * weight.unsqueeze(-1)) @ dS, g)
            dw = (xk * dSB).sum(-1)  # (b, h, q)
            ddtk = ddtk + decay[:, :, -1] * dw
            wdw = weight * dw
            dcum = dcum - wdw
            dcum[:, :, -1] += wdw.sum(-1)
            # cum_t = sum_{k<=t} dA_k; dA_k = dt_k A
            ddA = dcum.flip(-1).cumsum(-1).flip(-1)
            ddt[:, :, s0:s1] = ddtk + ddA * Af
            dAparam += (ddA * dtk).sum((0, 2))
            dx[:, :, s0:s1], dB[:, :, s0:s1], dC[:, :, s0:s1] = dxk, dBk, dCk
            dS = dS0
        dinit = dS.to(ctx.initial_dtype) if ctx.has_initial else None
        return (dx.permute(0, 2, 1, 3).to(x.dtype), ddt.transpose(1, 2).to(dt.dtype), dAparam.to(A.dtype),
                dB.permute(0, 2, 1, 3).to(B.dtype), dC.permute(0, 2, 1, 3).to(C.dtype), dinit, None, None)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk: int = 64,
             initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, computed chunk by chunk.

    x (b, l, h, p), dt (b, l, h) after softplus, A (h,) negative, B and C (b, l, g, n) with g dividing h (heads
    of a group are contiguous, as in mamba-ssm), initial_state (b, h, p, n) or None (zeros). Returns y (b, l, h, p)
    float32 and the state after the last token. Inside a chunk the outputs are one masked matmul (SSD's quadratic
    form); the state passes between chunks in a loop over l / chunk steps (never over tokens), which keeps every
    temporary small enough to stay in cache on CPU. Everything is float32.
    """
    return SSDScan.apply(x, dt, A, B, C, initial_state, chunk, torch.is_grad_enabled())
