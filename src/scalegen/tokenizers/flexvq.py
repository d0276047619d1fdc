"""FlexVAE (FlexVAR's tokenizer): LlamaGen's VQ-16 with an L2-normalised codebook, quantised one scale at a time.

No residual and no phi: the tokens of scale k are the nearest codes of the latent area-downsampled to that scale,
so every scale is a complete image and any single scale decodes on its own (a pn x pn map gives a 16*pn px image).
Reference: FlexVAR's models/vq_llama.py (LlamaGen's vq_model.py plus the multi-scale methods).

Training (official code never released): in train mode `forward` quantises and decodes the finest scale plus
`train_scales` random coarser ones and returns the reconstructions coarse to fine, which
`scalegen.tokenizers.train.TokenizerModule` compares with the image resized to each one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalegen.schedule.scales import ScaleSchedule, area_down
from scalegen.tokenizers.llamagen import LlamaGenDecoder, LlamaGenEncoder


class L2Quantizer(nn.Module):
    """Cosine VQ (LlamaGen's VectorQuantizer): z and the codebook L2-normalised, straight-through output."""

    def __init__(self, vocab_size: int = 8912, dim: int = 32, beta: float = 0.25, l2_norm: bool = True,
                 usage_window: int = 65536):
        super().__init__()
        self.vocab_size, self.dim, self.beta, self.l2_norm = vocab_size, dim, beta, l2_norm
        self.embedding = nn.Embedding(vocab_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        # the last `usage_window` code indices seen in training (the official `codebook_used`, kept for strict loads)
        self.register_buffer("codebook_used", torch.zeros(usage_window))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1) if self.l2_norm else self.embedding.weight

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,C,h,w) -> (straight-through codes (B,C,h,w), VQ + commitment loss, indices (B*h*w,) row-major)."""
        # expression order of the official quantizer: argmin ties and the z + (e - z) rounding come out the same
        z = torch.einsum("b c h w -> b h w c", z).contiguous()
        z_flat = z.view(-1, self.dim)
        embedding = self.codebook()
        if self.l2_norm:
            z, z_flat = F.normalize(z, p=2, dim=-1), F.normalize(z_flat, p=2, dim=-1)
        d = torch.sum(z_flat**2, dim=1, keepdim=True) + torch.sum(embedding**2, dim=1) - 2 * torch.einsum(
            "bd,dn->bn", z_flat, torch.einsum("n d -> d n", embedding))
        idx = torch.argmin(d, dim=1)
        z_q = embedding[idx].view(z.shape)
        if self.training:
            self._record(idx)
        loss = torch.mean((z_q - z.detach()) ** 2) + self.beta * torch.mean((z_q.detach() - z) ** 2)
        z_q = z + (z_q - z).detach()
        return torch.einsum("b h w c -> b c h w", z_q), loss, idx

    @torch.no_grad()
    def _record(self, idx: torch.Tensor) -> None:
        n = min(idx.numel(), self.codebook_used.numel())
        self.codebook_used.copy_(torch.cat((self.codebook_used[n:], idx[-n:].to(self.codebook_used.dtype))))

    def usage_percent(self, tokens_per_step: int = 0, world_size: int = 1) -> list[float]:
        """Share of the codebook among the last `usage_window` training indices (the official codebook_usage)."""
        return [len(torch.unique(self.codebook_used)) / self.vocab_size * 100]

    def lookup(self, idx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h*w) indices -> (B, C, h, w) normalised codewords (a channels-last view, as the official sampler)."""
        return self.codebook()[idx].reshape(idx.shape[0], *size, self.dim).permute(0, 3, 1, 2)


class FlexVAE(nn.Module):
    """encoder -> 1x1 quant_conv -> per-scale cosine VQ -> 1x1 post_quant_conv -> decoder (LlamaGen VQ-16)."""

    discrete = True
    residual = False  # each scale is quantised on its own: any scale list, any single scale decodes
    stochastic = False
    statistics = ()

    def __init__(self, vocab_size: int = 8912, codebook_dim: int = 32, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, dropout: float = 0.0,
                 beta: float = 0.25, l2_norm: bool = True, in_channels: int = 3, norm_groups: int = 32,
                 usage_window: int = 65536, train_scales: int = 3, min_train_side: int = 1):
        super().__init__()
        conv = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout,
                    norm_groups=norm_groups)
        self.encoder = LlamaGenEncoder(in_channels=in_channels, **conv)
        self.decoder = LlamaGenDecoder(out_channels=in_channels, **conv)
        self.quantize = L2Quantizer(vocab_size, codebook_dim, beta, l2_norm, usage_window)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.vocab_size, self.latent_channels = vocab_size, codebook_dim
        self.train_scales, self.min_train_side = train_scales, min_train_side

    # -- the continuous path ---------------------------------------------------------------------------------------
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] -> continuous latent (B, codebook_dim, H/16, W/16), before quantisation."""
        return self.quant_conv(self.encoder(img))

    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        img = self.decoder(self.post_quant_conv(latent))
        return img.clamp_(-1, 1) if clamp else img

    # -- tokens ----------------------------------------------------------------------------------------------------
    def quantize_at(self, latent: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latent area-downsampled to `size`, quantised: (straight-through codes, VQ loss, indices (B, h*w))."""
        z_q, loss, idx = self.quantize(area_down(latent, size))
        return z_q, loss, idx.view(latent.shape[0], -1)

    def quantize_scales(self, latent: torch.Tensor, scales) -> list[torch.Tensor]:
        """Per-scale indices (B, h*w), each scale on its own (the official trainer's encode_var_wo_firstL)."""
        return [self.quantize_at(latent, size)[2] for size in ScaleSchedule.of(scales).sizes]

    def codes(self, idx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.quantize.lookup(idx, size)

    def decode_code(self, idx: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
        """Indices of one scale (B, h*w) -> image of 16*h x 16*w px (the official decode_code)."""
        return self.decode(self.codes(idx, size).contiguous(), clamp)

    def _encode_at(self, features: torch.Tensor, size: tuple[int, int]):
        """Encoder features area-downsampled to `size`, then quant_conv and VQ (the official multi_scale_encode)."""
        z_q, loss, idx = self.quantize(self.quant_conv(area_down(features, size)))
        return z_q, loss, idx.view(features.shape[0], -1)

    def decode_scales(self, img: torch.Tensor, scales, clamp: bool = False) -> list[torch.Tensor]:
        """Each scale's reconstruction at its own size (the official `vae(img, v_patch_nums)`)."""
        features = self.encoder(img)
        return [self.decode(self._encode_at(features, size)[0], clamp) for size in ScaleSchedule.of(scales).sizes]

    # -- training --------------------------------------------------------------------------------------------------
    def _train_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        """The finest scale plus `train_scales` distinct random coarser ones, coarse to fine."""
        top = max(h, w)
        sides = torch.arange(self.min_train_side, top)
        if not self.training or self.train_scales <= 0 or len(sides) == 0:
            return [(h, w)]
        pick = sides[torch.randperm(len(sides))[: self.train_scales]].sort().values.tolist()
        return [(max(1, round(s * h / top)), max(1, round(s * w / top))) for s in pick] + [(h, w)]

    def forward(self, img: torch.Tensor):
        """(reconstruction(s), VQ loss, per-scale hit counts (V,)): train mode gives a list, coarse to fine."""
        features = self.encoder(img)
        recons, loss, hits = [], 0.0, []
        sizes = self._train_sizes(*features.shape[-2:])
        for size in sizes:  # the path of the official multi-scale forward: pool the features, then quant_conv
            z_q, vq_loss, idx = self._encode_at(features, size)
            recons.append(self.decode(z_q, clamp=False))
            loss = loss + vq_loss / len(sizes)
            hits.append(idx.flatten().bincount(minlength=self.vocab_size).float())
        return (recons if len(recons) > 1 else recons[0]), loss, hits

    def codebook_usage(self, hits: list[torch.Tensor], sizes: list[tuple[int, int]]) -> dict[str, float]:
        """The official rolling usage over every scale (`usage`), and the share of the codebook each scale of this step
        hit, by its token-map size (`usage_4x4`): each scale is quantised on its own, and a step draws its scales."""
        out = {"usage": self.quantize.usage_percent()[0]}
        for (h, w), row in zip(sizes, hits):
            out[f"usage_{h}x{w}"] = (row > 0).float().mean().item() * 100
        return out
