"""`DirectVQComposition` (FlexVAR): each scale's targets are the code indices of the latent area-downsampled to
that scale, quantised on its own; the input of scale k is scale k-1's codewords upsampled (bicubic).

Nothing accumulates across scales, so the schedule is free: any list of sizes (`at`), and the image is
decoded from the last scale's tokens alone (official trainer.py:57-86 and
flexvar.py:243-255).
"""
from __future__ import annotations

import torch

from scalegen.schedule.anyscale import own_or
from scalegen.schedule.scales import ScaleSchedule, bicubic_up


class DirectVQComposition:
    discrete = True
    scale_free = True  # targets and inputs depend on the schedule's sizes only

    def __init__(self, tokenizer, scales):
        self.tokenizer = tokenizer
        self.scales = ScaleSchedule.of(scales)
        self.token_dim = tokenizer.latent_channels
        self.vocab_size = tokenizer.vocab_size

    @staticmethod
    def incompatible(tokenizer_cls) -> str | None:
        """Why a tokenizer class cannot serve this composition (None when it can); checked at config time."""
        if not tokenizer_cls.discrete or tokenizer_cls.residual:
            return (f"needs a non-residual VQ tokenizer that quantises every scale on its own (e.g. FlexVAE); "
                    f"{tokenizer_cls.__name__} is not one")
        return None

    def at(self, scales, key: str = "scales") -> "DirectVQComposition":
        """The composition for `scales` (any steps, any final size; None: this one)."""
        sched = own_or(self, scales, key)
        return self if sched == self.scales else DirectVQComposition(self.tokenizer, sched)

    @torch.no_grad()
    def targets(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B,C,h,w) -> per-scale indices (B, h_k*w_k). The last scale may be coarser than the latent."""
        return self.tokenizer.quantize_scales(latent, self.scales)

    def _next(self, codes: torch.Tensor, si: int) -> torch.Tensor:
        return bicubic_up(codes, self.scales.sizes[si + 1]).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def teacher_inputs(self, targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale indices -> inputs of scales 1..K-1 (B, L - n0, C): each scale's codewords, upsampled to the next."""
        sizes = self.scales.sizes
        out = [self._next(self.tokenizer.codes(idx, sizes[si]), si) for si, idx in enumerate(targets[:-1])]
        if not out:
            return torch.zeros(targets[0].shape[0], 0, self.token_dim, device=targets[0].device)
        return torch.cat(out, dim=1)

    def begin(self, batch: int, device) -> None:
        return None  # no running sum: the state is the last scale's codes

    def advance(self, si: int, state, idx: torch.Tensor, soft: torch.Tensor | None = None):
        """Scale si's tokens (or a soft mix over the codebook) -> (their code map, the next scale's input or None)."""
        size = self.scales.sizes[si]
        if soft is None:
            codes = self.tokenizer.codes(idx, size)
        else:
            codebook = self.tokenizer.quantize.codebook()
            codes = (soft @ codebook.unsqueeze(0)).transpose(1, 2).reshape(idx.shape[0], -1, *size)
        return codes, (None if si == len(self.scales) - 1 else self._next(codes, si))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The last scale's codes -> image in [-1, 1] (16 px per token)."""
        return self.tokenizer.decode(codes.contiguous())
