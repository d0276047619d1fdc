"""FlowAR's scale-wise transformer, built from the shared AdaLN blocks (RMSNorm, SwiGLU-GELU, 2D RoPE options).

The sequence is `[class token] ++ z_proj(input of scale 2) ++ ... ++ z_proj(input of scale K)`; output block k
conditions the head at scale k. Two stacks of blocks ("encoder"/"decoder", MAR's names; nothing is masked) with a
learnt position table before each and one after, RMSNorms with gains between them; both stacks live in one `blocks`
list (the first `encoder_depth` are the encoder's), so activation checkpointing and FSDP wrap them as any backbone's.
Its size knobs are every backbone's (`depth`, `width`, `num_heads`): `depth` counts the blocks of both stacks and is
split evenly unless a stack's depth is given (`split_depth`), as the releases are symmetric (S 6+6, L 8+8, H 15+15).
The block-causal mask in training (on the `attention` path: auto | dense | flex, generators/attention.py) and the KV
cache in generation give the same numbers. Reference: FlowAR's models/flowar.py:164-449.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scalegen.generators.attention import AdaLNBlock, AttnMask, RMSNorm, check_attention_path, sequence_mask
from scalegen.generators.rope import rope_table
from scalegen.schedule.anyscale import own_or
from scalegen.schedule.scales import ScaleSchedule

DEFAULT_DEPTH = 12  # FlowAR-S: 6 encoder + 6 decoder blocks


def split_depth(depth: int | None, encoder_depth: int | None = None, decoder_depth: int | None = None) -> tuple[int, int]:
    """(encoder, decoder) block counts: the stacks given win, the rest of `depth` goes to the other stack, and with
    neither given the encoder takes depth // 2 and the decoder the rest (depth 12/16/30 = FlowAR-S/L/H)."""
    for key, value in (("depth", depth), ("encoder_depth", encoder_depth), ("decoder_depth", decoder_depth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"backbone.{key}: {value!r} must be an integer >= 0")
    if encoder_depth is not None and decoder_depth is not None:
        if depth is not None and depth != encoder_depth + decoder_depth:
            raise ValueError(f"backbone.depth {depth} != backbone.encoder_depth {encoder_depth} + backbone.decoder_depth "
                             f"{decoder_depth}: set depth to their sum, or null one of them to derive it from depth")
        return encoder_depth, decoder_depth
    depth = DEFAULT_DEPTH if depth is None else depth
    if encoder_depth is None and decoder_depth is None:
        encoder_depth = depth // 2
    given = encoder_depth if encoder_depth is not None else decoder_depth
    if given > depth:
        raise ValueError(f"backbone.depth {depth} is smaller than the stack depth given ({given}): raise depth")
    other = depth - given
    return (given, other) if encoder_depth is not None else (other, given)


class FlowARTransformer(nn.Module):
    scale_free = False  # position tables and RoPE are laid out for the schedule it was built with

    def __init__(self, num_classes: int = 1000, token_dim: int = 16, scales: Sequence = (1, 2, 4, 8, 16),
                 width: int = 768, depth: int | None = None, num_heads: int = 12, encoder_depth: int | None = None,
                 decoder_depth: int | None = None,
                 mlp_ratio: float = 4.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 norm_eps: float = 1e-6, rope_grid: float = 16, rope_theta: float = 10000.0, attention: str = "auto"):
        super().__init__()
        self.attention, self.attn_drop_rate = check_attention_path(attention), attn_drop_rate
        if width % num_heads:
            raise ValueError(f"backbone.width {width} is not divisible by backbone.num_heads {num_heads}")
        self.scales = ScaleSchedule.of(scales)
        self.num_classes, self.token_dim, self.width = num_classes, token_dim, width
        encoder_depth, decoder_depth = split_depth(depth, encoder_depth, decoder_depth)
        self.encoder_depth, self.depth = encoder_depth, encoder_depth + decoder_depth
        self.first_l = self.scales.token_counts[0]
        L = self.scales.num_tokens

        self.class_emb = nn.Embedding(num_classes + 1, width)  # index num_classes = the null class (CFG)
        self.z_proj = nn.Linear(token_dim, width)
        # the official names them encoder/decoder/diffusion_pos_embed_learned; AdamW decays them (FlowAR's recipe)
        self.enc_pos = nn.Parameter(torch.zeros(1, L, width))
        self.dec_pos = nn.Parameter(torch.zeros(1, L, width))
        self.head_pos = nn.Parameter(torch.zeros(1, L, width))
        self.z_proj_ln = RMSNorm(width, norm_eps, weight=True)
        block = dict(dim=width, cond_dim=width, num_heads=num_heads, mlp_ratio=mlp_ratio, drop=proj_drop_rate,
                     attn_drop=attn_drop_rate, norm_eps=norm_eps, attn_l2_norm=False, norm="rms", mlp="swiglu",
                     qkv_bias="all", attn_scale=(width // num_heads) ** -0.5)
        self.blocks = nn.ModuleList(AdaLNBlock(**block) for _ in range(encoder_depth + decoder_depth))
        self.encoder_norm = RMSNorm(width, norm_eps, weight=True)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_norm = RMSNorm(width, norm_eps, weight=True)

        cos, sin = rope_table(width // num_heads, self.scales.sizes, rope_grid, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """FlowAR's `initialize_weights`: xavier-uniform linears with zero bias, N(0, 0.02) class and positions."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        for t in (self.class_emb.weight, self.enc_pos, self.dec_pos, self.head_pos):
            nn.init.normal_(t, std=0.02)

    def resolve_scales(self, scales=None, key: str = "scales") -> ScaleSchedule:
        """The schedule a call runs on: the built one; another one is refused (the tables are laid out for it)."""
        return own_or(self, scales, key)

    # -- the two stacks, shared by the full forward and generation -------------------------------------------------
    def _run(self, blocks, x, cond, mask, rope):
        for blk in blocks:
            x = blk(x, cond, mask, rope)
        return x

    def _body(self, x: torch.Tensor, cond: torch.Tensor, begin: int, end: int, mask: AttnMask) -> torch.Tensor:
        """Positions [begin, end) of the sequence, embedded -> the head's condition for them."""
        rope = (self.rope_cos[begin:end], self.rope_sin[begin:end])
        x = self.z_proj_ln(x + self.enc_pos[:, begin:end])
        x = self.encoder_norm(self._run(self.blocks[: self.encoder_depth], x, cond, mask, rope))
        x = self.decoder_embed(x) + self.dec_pos[:, begin:end]
        x = self.decoder_norm(self._run(self.blocks[self.encoder_depth:], x, cond, mask, rope))
        return x + self.head_pos[:, begin:end]

    def start(self, labels: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (B,) -> the first scale's input (the class token, repeated if that scale has several) and the cond."""
        self.resolve_scales(scales)
        cond = self.class_emb(labels)
        return cond.unsqueeze(1).expand(-1, self.first_l, -1), cond

    def embed_scale(self, si: int, tokens: torch.Tensor, scales=None) -> torch.Tensor:
        """Input features of scale si (B, n, token_dim) -> model inputs (B, n, C); positions are added in `step`."""
        return self.z_proj(tokens)

    # -- training --------------------------------------------------------------------------------------------------
    def forward(self, labels: torch.Tensor, inputs: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. labels (B,), inputs (B, L - n0, token_dim) -> hidden (B, L, C), cond (B, C)."""
        scales = self.resolve_scales(scales)
        x, cond = self.start(labels, scales)
        x = torch.cat((x, self.z_proj(inputs)), dim=1)
        L = x.shape[1]
        mask = sequence_mask(scales, "block_causal", self.attention, x.device,
                             self.attn_drop_rate if self.training else 0.0, L)
        return self._body(x, cond, 0, L, mask), cond

    # -- generation ------------------------------------------------------------------------------------------------
    def kv_caching(self, enable: bool) -> None:
        for blk in self.blocks:
            blk.attn.kv_caching(enable)

    def step(self, x: torch.Tensor, cond: torch.Tensor, si: int, scales=None) -> torch.Tensor:
        """Scale si with the KV cache on: its inputs (B, n, C) -> hidden (B, n, C); positions from its offsets."""
        begin, end = self.resolve_scales(scales).offsets[si]
        return self._body(x, cond, begin, end, None)
