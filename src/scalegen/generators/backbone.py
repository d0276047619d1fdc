"""The sequence model over scales: embeddings of the class and the per-scale inputs, AdaLN blocks, a KV cache.

Position p of scale k sees every position of scales <= k (block-causal; `attention` picks how the teacher-forced
pass masks it: auto | dense | flex, see generators/attention.py). The first scale's input is the class
embedding itself (the start token); the inputs of scale k come from the tokenizer's composition of scales < k.
Every call takes the run's schedule (`scales`, None: the one the backbone was built with); VAR's backbone learns
a position per token of that schedule, so it is tied to it (`scale_free = False`) and refuses another one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scalegen.generators.attention import AdaLNBlock, AttnMask, ada_linear, check_attention_path, sequence_mask
from scalegen.schedule.anyscale import own_or
from scalegen.schedule.scales import VAR_256, ScaleSchedule


class AdaLNTransformer(nn.Module):
    ada_chunks = 6  # AdaLN vectors per block (gamma, scale, shift of attention and MLP); M-VAR's blocks take 9
    scale_free = False  # one learnt position and level embedding per token of the schedule it was built with
    mask_kind = "block_causal"  # a query sees its own and coarser scales (M-VAR: block_diagonal, its own only)

    def __init__(self, num_classes: int = 1000, token_dim: int = 32, scales: Sequence = VAR_256, depth: int = 16,
                 width: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float | None = None, norm_eps: float = 1e-6,
                 shared_aln: bool = False, attn_l2_norm: bool = True, attention: str = "auto"):
        super().__init__()
        self.attention, self.attn_drop_rate = check_attention_path(attention), attn_drop_rate
        # VAR's size rule (models/__init__.py): width 64 per layer, one head per layer, drop path 0.1 * depth / 24
        width = width or 64 * depth
        num_heads = num_heads or depth
        drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.scales = ScaleSchedule.of(scales)
        self.num_classes, self.token_dim, self.width, self.depth = num_classes, token_dim, width, depth
        self.first_l = self.scales.token_counts[0]
        L = self.scales.num_tokens

        init_std = (1 / width / 3) ** 0.5
        self.class_emb = nn.Embedding(num_classes + 1, width)  # index num_classes = the null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))
        self.pos_embed = nn.Parameter(torch.empty(1, L, width))  # absolute position of every token of every scale
        self.lvl_embed = nn.Embedding(len(self.scales), width)
        self.word_embed = nn.Linear(token_dim, width)
        for t in (self.class_emb.weight, self.pos_start, self.pos_embed, self.lvl_embed.weight):
            nn.init.trunc_normal_(t, mean=0, std=init_std)

        self.shared_ada_lin = ada_linear(width, self.ada_chunks * width) if shared_aln else None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth, none in block 0
        self.blocks = nn.ModuleList(
            self.make_block(width, width, num_heads, mlp_ratio, drop_rate, attn_drop_rate, dpr[i], norm_eps, shared_aln, attn_l2_norm)
            for i in range(depth)
        )

    def make_block(self, *args) -> nn.Module:
        """One block from AdaLNBlock's positional arguments; subclasses swap the block (M-VAR adds a Mamba2 mixer)."""
        return AdaLNBlock(*args)

    # -- the schedule of a call ---------------------------------------------------------------------------------------
    def resolve_scales(self, scales=None, key: str = "scales") -> ScaleSchedule:
        """The schedule a call runs on: the built one (None), or `scales` where this backbone allows it."""
        return own_or(self, scales, key)

    def attention_bias(self, scales: ScaleSchedule, device=None) -> torch.Tensor:
        """The teacher-forced pass's dense mask (L, L): a query sees its own and coarser scales (M-VAR: its own only)."""
        return scales.bias(self.mask_kind, device)

    def attention_mask(self, scales: ScaleSchedule, length: int, device) -> AttnMask:
        """The mask the teacher-forced pass runs with, on this backbone's `attention` path (`sequence_mask`)."""
        dropout = self.attn_drop_rate if self.training else 0.0
        return sequence_mask(scales, self.mask_kind, self.attention, device, dropout, length)

    def level_pos(self, scales: ScaleSchedule) -> torch.Tensor:
        """(1, L, C): level embedding + absolute position of every token of `scales`."""
        return self.lvl_embed(scales.level_ids(self.pos_embed.device).unsqueeze(0)) + self.pos_embed

    # -- pieces shared by the full forward and generation ----------------------------------------------------------
    def block_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if self.shared_ada_lin is None:
            return cond
        return self.shared_ada_lin(cond).view(-1, 1, self.ada_chunks, self.width)

    def start(self, labels: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (B,) -> the first scale's input (B, n0, C) and the class condition (B, C)."""
        scales = self.resolve_scales(scales)
        cond = self.class_emb(labels)
        x = cond.unsqueeze(1).expand(-1, self.first_l, -1) + self.pos_start.expand(labels.shape[0], -1, -1)
        return x + self.level_pos(scales)[:, : self.first_l], cond

    def embed_scale(self, si: int, tokens: torch.Tensor, scales=None) -> torch.Tensor:
        """Input features of scale si (B, n, token_dim) -> model inputs (B, n, C)."""
        scales = self.resolve_scales(scales)
        begin, end = scales.offsets[si]
        return self.word_embed(tokens) + self.level_pos(scales)[:, begin:end]

    # -- training --------------------------------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor, inputs: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. labels (B,), inputs (B, L - n0, token_dim) -> hidden (B, L, C), cond (B, C)."""
        scales = self.resolve_scales(scales)
        B = labels.shape[0]
        cond = self.class_emb(labels)
        x = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((x, self.word_embed(inputs.float())), dim=1)
        L = x.shape[1]
        x = x + self.level_pos(scales)[:, :L]
        block_cond = self.block_cond(cond)
        mask = self.attention_mask(scales, L, x.device)
        for block in self.blocks:
            x = block(x, block_cond, mask)
        return x, cond

    # -- generation ------------------------------------------------------------------------------------------------
    def kv_caching(self, enable: bool) -> None:
        for block in self.blocks:
            block.attn.kv_caching(enable)

    def step(self, x: torch.Tensor, cond: torch.Tensor, si: int, scales=None) -> torch.Tensor:
        """Scale si with the KV cache on: its inputs (B, n, C) -> hidden (B, n, C). The cache holds the coarser
        scales, so neither a mask nor the schedule is needed here."""
        block_cond = self.block_cond(cond)
        for block in self.blocks:
            x = block(x, block_cond, None)
        return x
