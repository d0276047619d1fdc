"""M-VAR's backbone (Ren et al. 2024): attention within each scale, Mamba2 across the whole sequence, then the MLP.

The block is VAR's AdaLN block with a third residual branch (OliverRensu/MVAR models/basic_mvar.py:121-176):

    g1,g2,g3, s1,s2,s3, b1,b2,b3 = ada_lin(cond)                      (9 chunks, in the official row order)
    x += g1 * attn(LN(x)(1+s1)+b1)      bidirectional inside each scale, nothing across scales
    x += g2 * Mamba2(LN(x)(1+s2)+b2)    causal over the flat coarse-to-fine sequence
    x += g3 * mlp(LN(x)(1+s3)+b3)

Training runs every scale at once: attention inside each scale (one SDPA call per scale, no mask, Σ n_k² instead of
L² scores; `attention=dense` the block-diagonal bias, `flex` its BlockMask), Mamba2 over all L tokens. Generation
runs one scale per `step`: attention needs no cache (a scale sees only itself) and each block carries its Mamba2
state (conv inputs + SSM state) to the next scale, so the prefix is never scanned again (the official code re-runs
Mamba2 over the whole prefix at every scale). Train and eval mode compute the same thing, at any scale size.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp

from scalegen.generators.attention import AttnMask, SelfAttention, ada_linear, block_modulations, modulate
from scalegen.generators.backbone import AdaLNTransformer
from scalegen.generators.flexvar import ScalePositions
from scalegen.generators.mamba2 import Mamba2, MambaState
from scalegen.schedule.scales import VAR_256


class MambaAdaLNBlock(nn.Module):
    """One M-VAR block. Positional arguments are AdaLNBlock's; the Mamba2 options follow as keywords."""

    ada_chunks = 9

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = False, *, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 mamba_backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, attn_drop, drop, attn_l2_norm)
        self.mamba = Mamba2(dim, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, backend=mamba_backend)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=(0.0, drop))
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)  # one weightless LN for all three branches
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shared_aln = shared_aln
        if shared_aln:  # the model-wide projection gives (B,1,9,C); each block adds its own learnt offset
            self.ada_gss = nn.Parameter(torch.randn(1, 1, self.ada_chunks, dim) / dim**0.5)
        else:
            self.ada_lin = ada_linear(cond_dim, self.ada_chunks * dim)
        self.caching, self.state = False, None

    def state_caching(self, enable: bool) -> None:
        """On: each call continues the sequence of the previous calls (generation). Off: each call is a whole sequence."""
        self.caching, self.state = enable, None

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: AttnMask = None) -> torch.Tensor:
        mods = block_modulations(self, cond, self.ada_chunks, self.caching)
        gamma1, gamma2, gamma3, scale1, scale2, scale3, shift1, shift2, shift3 = mods
        x = x + self.drop_path(self.attn(modulate(self.norm(x), scale1, shift1), mask).mul_(gamma1))
        h = modulate(self.norm(x), scale2, shift2)
        if self.caching:
            h, self.state = self.mamba.step(h, self.state)
        else:
            h = self.mamba(h)
        x = x + self.drop_path(h.mul(gamma2))
        return x + self.drop_path(self.mlp(modulate(self.norm(x), scale3, shift3)).mul(gamma3))


class MambaAdaLNTransformer(AdaLNTransformer):
    """M-VAR: the AdaLN transformer's embeddings and contract, with MambaAdaLNBlocks and intra-scale attention.

    The Mamba2 options are mamba_ssm's (M-VAR: d_state 64, d_conv 4, expand 2, headdim 64). `mamba_backend`:
    auto (mamba-ssm kernels for CUDA tensors when installed, else our PyTorch scan) | torch | mamba_ssm.
    """

    ada_chunks = MambaAdaLNBlock.ada_chunks
    mask_kind = "block_diagonal"  # within each scale; Mamba2 carries the sequence across scales

    def __init__(self, num_classes: int = 1000, token_dim: int = 32, scales: Sequence = VAR_256, depth: int = 16,
                 width: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float | None = None, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = False, d_state: int = 64, d_conv: int = 4,
                 expand: int = 2, headdim: int = 64, mamba_backend: str = "auto", attention: str = "auto"):
        # read by make_block while the parent builds the blocks (a plain attribute may be set before Module.__init__)
        self.mamba_options = dict(d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, mamba_backend=mamba_backend)
        super().__init__(num_classes, token_dim, scales, depth, width, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                         drop_path_rate, norm_eps, shared_aln, attn_l2_norm, attention)
        with torch.no_grad():  # the official init_weights: depthwise conv from trunc_normal(0.02), zero bias
            for block in self.blocks:
                nn.init.trunc_normal_(block.mamba.conv1d.weight, std=0.02)
                block.mamba.conv1d.bias.zero_()

    def make_block(self, *args) -> nn.Module:
        return MambaAdaLNBlock(*args, **self.mamba_options)

    # -- generation: a Mamba2 state per block instead of a KV cache -----------------------------------------------
    def kv_caching(self, enable: bool) -> None:
        """The backbone contract's cache switch: here it carries each block's Mamba2 state from scale to scale."""
        for block in self.blocks:
            block.state_caching(enable)

    def cache_states(self) -> list[MambaState | None]:
        """The per-block Mamba2 states held now (for inspection and tests)."""
        return [block.state for block in self.blocks]


class ScaleFreeMambaTransformer(ScalePositions, MambaAdaLNTransformer):
    """M-VAR's blocks with FlexVAR's scale-free positions (the ScalePositions mixin of generators/flexvar.py): one 2-D
    table area-resized to every scale and no level embedding, so training may draw a new schedule per step and
    generation may use any list. Nothing else in M-VAR depends on the schedule: Mamba2 scans whatever it gets."""

    def __init__(self, num_classes: int = 1000, token_dim: int = 32, scales: Sequence = VAR_256, depth: int = 16,
                 width: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float | None = None, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = False, d_state: int = 64, d_conv: int = 4,
                 expand: int = 2, headdim: int = 64, mamba_backend: str = "auto", pos_grid: int = 32,
                 attention: str = "auto"):
        super().__init__(num_classes, token_dim, scales, depth, width, num_heads, mlp_ratio, drop_rate, attn_drop_rate,
                         drop_path_rate, norm_eps, shared_aln, attn_l2_norm, d_state, d_conv, expand, headdim,
                         mamba_backend, attention, pos_grid=pos_grid)
