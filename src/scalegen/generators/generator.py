"""A generator = a backbone over scales + a head; plus VAR's weight initialisation (VAR's models/var.py:236-286)."""
from __future__ import annotations

import torch
import torch.nn as nn

from scalegen.parts import Backbone, Head


class Generator(nn.Module):
    def __init__(self, backbone: Backbone, head: Head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, labels: torch.Tensor, inputs: torch.Tensor, targets: list[torch.Tensor], scales=None):
        """The training contract of every head: labels (B,), teacher inputs (B, L - n0, token_dim) and the per-scale
        targets of `scales` (None: the backbone's own) -> (loss, per-scale logs). One call through the root module,
        as FSDP wants; logits (categorical head) are `head(*backbone(labels, inputs, scales))`."""
        scales = self.backbone.resolve_scales(scales)
        hidden, cond = self.backbone(labels, inputs, scales)
        return self.head.training_loss(hidden, cond, targets, scales)


@torch.no_grad()
def init_var_weights(gen: Generator, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1) -> None:
    """VAR's `init_weights`: trunc-normal linears, a small head, and AdaLN gates near zero so blocks start ~identity."""
    width = gen.backbone.width
    std = (1 / width / 3) ** 0.5 if init_std < 0 else init_std
    for m in gen.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    gen.head.var_init(init_head, init_adaln)  # the head owns its part (categorical: small logits, AdaLN at half)
    depth = len(gen.backbone.blocks)
    for block in gen.backbone.blocks:
        block.attn.proj.weight.div_((2 * depth) ** 0.5)
        block.mlp.fc2.weight.div_((2 * depth) ** 0.5)
        if block.shared_aln:
            block.ada_gss[:, :, 2:].mul_(init_adaln)
            block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
        else:
            w = block.ada_lin[-1].weight
            w[2 * width:].mul_(init_adaln)  # scale and shift rows
            w[: 2 * width].mul_(init_adaln_gamma)  # the residual gates
            block.ada_lin[-1].bias.zero_()
