"""The AdaLN transformer block: self-attention with a KV cache, an MLP, and adaptive LayerNorm from the class.

One attention module serves the teacher-forced training forward (masked over scales) and the scale-by-scale
generation (keys/values of earlier scales cached; the new scale sees them and itself, which is exactly the training
mask, so no mask is passed and SDPA may take its flash/efficient kernels). The teacher-forced mask takes one of the
paths of `attention` (auto | dense | flex), picked per call by `sequence_mask`: the dense additive bias through SDPA,
FlexAttention's BlockMask (block-sparse kernels; compiled on CUDA), or, for attention within each scale (M-VAR),
one SDPA call per scale (or per run of equal-size scales) without any mask. `attend` runs whichever it is given.
Reference: VAR's models/basic_var.py:58-162.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SwiGLU

from scalegen.generators.rope import apply_rope
from scalegen.schedule.scales import ScaleSchedule

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

log = logging.getLogger(__name__)

ATTENTION_PATHS = ("auto", "dense", "flex")


@dataclass(frozen=True)
class WithinSegments:
    """Attention inside consecutive segments of these lengths only (M-VAR's within-scale attention, no mask)."""

    lengths: tuple[int, ...]


# None (no mask) | a dense additive bias (L, L) | FlexAttention's BlockMask | WithinSegments
AttnMask = Union[torch.Tensor, "BlockMask", WithinSegments, None]

_LOGGED: set = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


def check_attention_path(path: str, key: str = "attention") -> str:
    if path not in ATTENTION_PATHS:
        raise ValueError(f"{key}={path!r}: allowed are {' | '.join(ATTENTION_PATHS)} (auto: flex where it runs, else dense)")
    return path


def flex_unavailable(device_type: str, dropout: float = 0.0) -> str | None:
    """Why FlexAttention cannot run a teacher-forced training pass on `device_type` (None: it can)."""
    if dropout > 0:
        return f"FlexAttention has no attention dropout (attn_drop_rate {dropout:g})"
    if device_type != "cuda":
        # measured on 2 cores, VAR-d16 shapes: dense SDPA 29 ms, flex 258 ms eager / 196 ms compiled, forward only
        return (f"FlexAttention has no backward on {device_type} in torch {torch.__version__.split('+')[0]}, and its "
                f"{device_type} forward is slower than the dense path")
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if importlib.util.find_spec("triton") is None:
        return "its CUDA kernels need triton, which is not installed"
    return None


def sequence_mask(sched: ScaleSchedule, kind: str, path: str, device: torch.device, dropout: float = 0.0,
                  length: int | None = None) -> AttnMask:
    """The mask of a teacher-forced pass over `sched` of `kind` (block_causal | block_diagonal) on `path`.

    dense: the (L, L) bias; flex: the schedule's BlockMask; auto: within each scale (block_diagonal) one attention
    per scale, else the BlockMask where FlexAttention runs (`flex_unavailable`), else the dense bias (said once).
    `dropout` is the attention dropout in effect (0 in eval mode); `length` < the schedule's tokens: a prefix."""
    check_attention_path(path)
    device = torch.device(device)
    if length is not None and length != sched.num_tokens:  # a partial sequence: only the dense mask slices
        return sched.bias(kind, device)[:length, :length]
    if path == "flex":
        if dropout > 0:
            raise ValueError(f"attention=flex: FlexAttention has no attention dropout (attn_drop_rate {dropout:g}); "
                             "use attention=dense or attn_drop_rate=0")
        return sched.block_mask(kind, device)
    if path == "auto":
        if kind == "block_diagonal":
            return WithinSegments(tuple(sched.token_counts))
        why = flex_unavailable(device.type, dropout)
        if why is None:
            return sched.block_mask(kind, device)
        _log_once(f"attention=auto: the {kind} pass takes the dense path ({why})")
    return sched.bias(kind, device)


_FLEX: dict = {}


def _flex(device_type: str):
    """flex_attention, compiled on CUDA (uncompiled it materialises the whole score matrix); eager elsewhere, the
    reference implementation (no-grad passes and tests on CPU)."""
    if device_type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention  # loads torch's compiler stack: on use only

        _FLEX[device_type] = torch.compile(flex_attention) if device_type == "cuda" else flex_attention
    return _FLEX[device_type]


def _within_segments(q, k, v, lengths: tuple[int, ...], scale: float, dropout: float) -> torch.Tensor:
    """Attention inside each segment: one SDPA call per segment, or per run of equal lengths packed into the batch.
    `split` (not slicing): its backward is one concatenation, where each slice's would fill a whole-sequence gradient."""
    runs: list[list[int]] = []  # [length, count] of each run of equal lengths
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    outs = []
    for (n, m), qs, ks, vs in zip(runs, *(t.split([n * m for n, m in runs], dim=2) for t in (q, k, v))):
        if m > 1:  # (B, H, m*n, d) -> (B*m, H, n, d)
            qs, ks, vs = (t.unflatten(2, (m, n)).transpose(1, 2).flatten(0, 1) for t in (qs, ks, vs))
        out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scale)
        outs.append(out.unflatten(0, (q.shape[0], m)).transpose(1, 2).flatten(2, 3) if m > 1 else out)
    return torch.cat(outs, dim=2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask, scale: float,
           dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over (B, H, L, d), whichever form the mask takes (see AttnMask)."""
    if isinstance(mask, WithinSegments):
        return _within_segments(q, k, v, mask.lengths, scale, dropout)
    if mask is None or isinstance(mask, torch.Tensor):
        bias = None if mask is None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    if dropout > 0:
        raise ValueError("attention=flex: FlexAttention has no attention dropout; use attention=dense or attn_drop_rate=0")
    return _flex(q.device.type)(q, k, v, block_mask=mask, scale=scale)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation x * (1 + scale) + shift, the one place every block and head uses it."""
    return x.mul(scale.add(1)).add_(shift)


class RMSNorm(nn.Module):
    """x / rms(x), computed in fp32 and cast back (FlowAR's RMSNorm); an optional learnt gain."""

    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


def ada_linear(cond_dim: int, out_dim: int) -> nn.Sequential:
    """SiLU then Linear: the conditioning projection (index 1 holds the weights, as in the checkpoints)."""
    return nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, out_dim))


def block_modulations(block: nn.Module, cond: torch.Tensor, chunks: int, generating: bool) -> tuple[torch.Tensor, ...]:
    """A block's AdaLN modulations of `cond`, `chunks` tensors (B, 1, C). While generating they are kept for the
    condition tensor: it is the same at every scale, and the projection's few rows would reread its weights."""
    if block.shared_aln:
        return (block.ada_gss + cond).unbind(2)
    memo = block.__dict__.get("_ada_memo")
    if generating and memo is not None and memo[0] is cond:
        return memo[1]
    mods = block.ada_lin(cond).view(-1, 1, chunks, block.dim).unbind(2)
    block._ada_memo = (cond, mods) if generating else None
    return mods


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, attn_l2_norm: bool = True,
                 qkv_bias: str = "qv", scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias not in ("qv", "all"):
            raise ValueError(f"qkv_bias={qkv_bias!r}: allowed values are 'qv' (VAR) and 'all' (FlowAR)")
        self.num_heads, self.head_dim, self.attn_l2_norm = num_heads, dim // num_heads, attn_l2_norm
        # 'all': one fused bias over q, k and v (timm/FlowAR); 'qv': VAR's learnt q and v biases, none on k
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "all")
        if qkv_bias == "qv":  # a k bias cancels in softmax
            self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
            self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        if attn_l2_norm:
            # cosine attention with a learnt per-head temperature, kept in log space and capped at 100
            self.scale = 1.0
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)  # VAR's choice, 4x below the usual 1/sqrt(d)
        if scale is not None:  # FlowAR: the usual 1/sqrt(d)
            self.scale = scale
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, mask: AttnMask = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)) if self.qkv.bias is None else self.qkv.bias
        qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if rope is not None:  # (cos, sin) of these L positions; keys enter the cache already rotated
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.caching:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = attend(q, k, v, mask, self.scale, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class AdaLNBlock(nn.Module):
    """x += g1 * attn(LN(x)(1+s1)+b1); x += g2 * mlp(LN(x)(1+s2)+b2), with (g1,g2,s1,s2,b1,b2) from the class.

    VAR: LayerNorm, GELU-tanh MLP, q/v biases. FlowAR: `norm="rms"`, `mlp="swiglu"` (timm SwiGLU with exact GELU,
    hidden int(dim * mlp_ratio * 2/3)), `qkv_bias="all"`, `attn_scale=head_dim**-0.5` and RoPE given to forward.
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True, norm: str = "layer", mlp: str = "gelu_tanh", qkv_bias: str = "qv",
                 attn_scale: float | None = None):
        super().__init__()
        if norm not in ("layer", "rms") or mlp not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"norm={norm!r} / mlp={mlp!r}: allowed are norm layer|rms and mlp gelu_tanh|swiglu")
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, attn_drop, drop, attn_l2_norm, qkv_bias, attn_scale)
        if mlp == "swiglu":
            self.mlp = SwiGLU(dim, int(dim * mlp_ratio * 2 / 3), act_layer=nn.GELU, drop=drop)
        else:
            self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=(0.0, drop))
        # one weightless norm serves both branches
        self.norm = RMSNorm(dim, norm_eps) if norm == "rms" else nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = shared_aln
        if shared_aln:  # the model-wide projection gives (B,1,6,C); each block adds its own learnt offset
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = ada_linear(cond_dim, 6 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: AttnMask = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = block_modulations(self, cond, 6, self.attn.caching)
        x = x + self.drop_path(self.attn(modulate(self.norm(x), scale1, shift1), mask, rope).mul_(gamma1))
        return x + self.drop_path(self.mlp(modulate(self.norm(x), scale2, shift2)).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """LN(x)(1+scale)+shift with (scale, shift) from the class: the normalisation in front of an output head."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = ada_linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return modulate(self.norm(x), scale, shift)
