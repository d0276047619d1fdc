"""How per-scale targets compose into the next scale's input: the seam between tokenizer and generator.

`ResidualComposition` is VAR's: targets are code indices of the residual at each scale; the input of scale k is
the area-downsampled running sum f_hat of the (phi-refined, upsampled) codes of scales < k.
"""
from __future__ import annotations

import torch

from scalegen.schedule.anyscale import own_or
from scalegen.schedule.scales import ScaleSchedule


class ResidualComposition:
    discrete = True
    scale_free = False  # each scale codes what the coarser ones left: the quantizer's schedule only

    def __init__(self, tokenizer, scales=None):
        self.tokenizer = tokenizer
        self.quantizer = tokenizer.quantize
        self.scales = ScaleSchedule.of(scales or self.quantizer.scales)
        self.token_dim = self.quantizer.channels
        self.vocab_size = self.quantizer.vocab_size

    @staticmethod
    def incompatible(tokenizer_cls) -> str | None:
        """None: scalegen.checks names the missing residual quantizer itself (model.composition=residual)."""
        return None

    def at(self, scales, key: str = "scales") -> "ResidualComposition":
        """This composition, for its own schedule only (anything else is refused, naming `key`)."""
        own_or(self, scales, key)
        return self

    @torch.no_grad()
    def targets(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B,C,h,w) -> per-scale indices (B, h_k*w_k)."""
        return self.quantizer.quantize(latent, self.scales)

    @torch.no_grad()
    def teacher_inputs(self, targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale indices -> generator inputs of scales 1..K-1, (B, L - n0, C)."""
        return self.quantizer.teacher_inputs(targets, self.scales)

    def begin(self, batch: int, device) -> torch.Tensor:
        return torch.zeros(batch, self.token_dim, *self.scales.final, device=device)

    def advance(self, si: int, f_hat: torch.Tensor, idx: torch.Tensor, soft: torch.Tensor | None = None):
        """Add scale si's tokens (or a soft mix over the codebook) to f_hat; return it and the next input (B, n, C)."""
        size = self.scales.sizes[si]
        if soft is None:
            codes = self.quantizer.embed(idx, size)
        else:
            codes = (soft @ self.quantizer.embedding.weight.unsqueeze(0)).transpose(1, 2).reshape(idx.shape[0], -1, *size)
        f_hat, nxt = self.quantizer.next_input(si, f_hat, codes, self.scales)
        return f_hat, None if nxt is None else nxt.flatten(2).transpose(1, 2)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Final f_hat -> image in [-1, 1]."""
        return self.tokenizer.decode(f_hat)
