"""Direct (non-residual) composition of continuous latents: FlowAR's scale design.

The target of scale k is the latent area-downsampled to s_k (the last scale: the latent itself); the input of
scale k+1 is scale k's map bicubic-upsampled to the full latent size, then area-downsampled to s_{k+1}
(flowar.py:355, "Up(s_k, 2)" in the paper, done as in VAR). Tokens are (B, h*w, C), row-major, channels last.
Reference: FlowAR's models/flowar.py:283-291 (patchify) and :355.
"""
from __future__ import annotations

from typing import Sequence

import torch

from scalegen.schedule.anyscale import own_or
from scalegen.schedule.scales import ScaleSchedule, area_down, bicubic_up


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), contiguous (as the official patchify: `randn_like` draws depend on the layout)."""
    return x.flatten(2).transpose(1, 2).contiguous()


def to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)


class DirectComposition:
    discrete = False
    vocab_size = None
    scale_free = False  # FlowAR's transformer is tied to its tables; the composition follows it

    def __init__(self, tokenizer, scales: Sequence, sample_up_size: int | Sequence[int] | None = None):
        """sample_up_size: the intermediate size of the next-input chain when sampling. None (default) is the latent
        size, as in training; the official sampler hard-codes 16 (flowar.py:422), which differs for other latents."""
        self.tokenizer = tokenizer
        self.scales = ScaleSchedule.of(scales)
        self.token_dim = tokenizer.latent_channels
        up = sample_up_size
        self.sample_up = self.scales.final if up is None else ((up, up) if isinstance(up, int) else tuple(up))

    @staticmethod
    def incompatible(tokenizer_cls) -> str | None:
        """None: any tokenizer's latent composes directly (a VQ tokenizer's too, before quantisation)."""
        return None

    def at(self, scales, key: str = "scales") -> "DirectComposition":
        """This composition, for its own schedule only (anything else is refused, naming `key`)."""
        own_or(self, scales, key)
        return self

    def _next(self, si: int, x: torch.Tensor, up: tuple[int, int]) -> torch.Tensor:
        """Scale si's map -> scale si+1's input tokens: bicubic to `up`, then area to s_{si+1}."""
        return to_tokens(area_down(bicubic_up(x, up), self.scales.sizes[si + 1]))

    @torch.no_grad()
    def targets(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Latent (B, C, h, w) -> per-scale tokens (B, h_k*w_k, C)."""
        self.scales.check_final(latent.shape[-2:], "scales")
        last = len(self.scales) - 1
        return [to_tokens(latent if k == last else area_down(latent, size)) for k, size in enumerate(self.scales.sizes)]

    @torch.no_grad()
    def teacher_inputs(self, targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale targets -> inputs of scales 1..K-1, (B, L - n0, C); the intermediate size is the latent's."""
        sizes, final = self.scales.sizes, self.scales.final
        out = [self._next(k, to_map(targets[k], sizes[k]), final) for k in range(len(sizes) - 1)]
        return torch.cat(out, dim=1) if out else targets[0].new_zeros(targets[0].shape[0], 0, self.token_dim)

    def begin(self, batch: int, device) -> None:
        return None

    def advance(self, si: int, state, tokens: torch.Tensor, soft=None):
        """Scale si's sampled tokens (B, n, C) -> (state = that scale's map, next scale's input tokens or None)."""
        x = to_map(tokens.float(), self.scales.sizes[si])
        if si == len(self.scales) - 1:
            return x, None
        return x, self._next(si, x, self.sample_up)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Final latent map -> image in [-1, 1]."""
        return self.tokenizer.decode(latent)
