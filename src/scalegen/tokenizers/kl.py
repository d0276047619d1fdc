"""MAR's KL VAE (`AutoencoderKL`, the LDM kl-f16 topology FlowAR uses): encode -> posterior, scaled latent, decode.

The residual, down/up-sampling blocks are the shared ones of `blocks.py`; what differs from VAR's VQVAE is the
attention block (separate 1x1 q/k/v convs, as in the `kl16.ckpt` keys), where attention sits (by resolution, MAR's
`attn_resolutions`: encoder at 16, decoder only in the middle) and the doubled encoder output (mean | logvar).
Reference: MAR's models/vae.py:450-461 (FlowAR ships the same file).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from scalegen.tokenizers import blocks as shared
from scalegen.tokenizers.blocks import AttnBlockQKV, Downsample, ResnetBlock, Upsample, _level, group_norm

LATENT_MODES = ("sample", "mean")


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlockQKV(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


class KLEncoder(nn.Module):
    """image (B,3,H,W) -> moments (B, 2*z, H/f, W/f) before quant_conv; attention after each block at attn_resolutions."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, resolution: int,
                 attn_resolutions: Sequence[int], in_channels: int = 3, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, dropout, norm_groups))
                width = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlockQKV(width, norm_groups))
            level = _level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = _mid(width, dropout, norm_groups)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    # the same pass as the VQ encoder (same module names); only where attention sits differs
    forward = shared.Encoder.forward


class KLDecoder(nn.Module):
    """latent (B, z, h, w) -> image (B, 3, h*f, w*f), unclamped; num_res_blocks + 1 blocks per level."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, resolution: int,
                 attn_resolutions: Sequence[int], out_channels: int = 3, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = _mid(width, dropout, norm_groups)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built coarse to fine, stored by level index (`up.0` is finest)
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * ch_mult[i], dropout, norm_groups))
                width = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(AttnBlockQKV(width, norm_groups))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    forward = shared.Decoder.forward


class Posterior:
    """A diagonal Gaussian from the moments (mean | logvar), logvar clamped to [-30, 20] as MAR's."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # on the generator's device; without one on the latent's (on CPU: the official `torch.randn(shape)` draw)
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), summed over C, H, W: (B,)."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """MAR's KL VAE. `encode` gives the generator's latent: the posterior sample (or mean) times `scale_factor`;
    `decode` undoes that scale, so the factor lives here and nowhere else.

    scale_factor: 1/std of the encoded latents of the training set (0.2325 for KL-16 on ImageNet, MAR issue #2);
    measure it for a new dataset with `python -m scalegen.tokenizers.latent_stats` (null: measured by train.py).
    """

    discrete = False
    residual = False
    statistics = ()
    stochastic = True  # encodes to a posterior: cached latents keep its moments and draw a fresh sample each step

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, resolution: int = 256, enc_attn_resolutions: Sequence[int] = (16,),
                 dec_attn_resolutions: Sequence[int] = (), dropout: float = 0.0, in_channels: int = 3,
                 norm_groups: int = 32, latent: str = "sample", scale_factor: float | None = 0.2325):
        super().__init__()
        if latent not in LATENT_MODES:
            raise ValueError(f"tokenizer.latent={latent!r}: allowed values are {list(LATENT_MODES)}")
        if scale_factor is not None and not scale_factor > 0:
            raise ValueError(f"tokenizer.scale_factor={scale_factor}: must be positive (or null to measure it)")
        conv = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=embed_dim,
                    resolution=resolution, dropout=dropout, norm_groups=norm_groups)
        self.encoder = KLEncoder(**conv, attn_resolutions=tuple(enc_attn_resolutions), in_channels=in_channels)
        self.decoder = KLDecoder(**conv, attn_resolutions=tuple(dec_attn_resolutions), out_channels=in_channels)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        self.embed_dim = self.latent_channels = embed_dim
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.latent, self.scale_factor = latent, scale_factor

    def _scale(self) -> float:
        if self.scale_factor is None:
            raise RuntimeError("tokenizer.scale_factor is null: measure it first (python -m scalegen.tokenizers."
                               "latent_stats) or let train.py measure it on the training data")
        return self.scale_factor

    def posterior(self, img: torch.Tensor) -> Posterior:
        """Image in [-1, 1] -> the diagonal Gaussian over the (unscaled) latent."""
        return Posterior(self.quant_conv(self.encoder(img)))

    def encode(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image -> the generator's latent (B, embed_dim, H/f, W/f): posterior sample (or mean) x scale_factor."""
        return self.latent_from_moments(self.quant_conv(self.encoder(img)), generator)

    def latent_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What `encode` gives, from the posterior's moments (mean | logvar), e.g. cached ones (scalegen.data.latents)."""
        post = Posterior(moments.float())
        z = post.sample(generator) if self.latent == "sample" else post.mean
        return z * self._scale()

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """The generator's latent -> image in [-1, 1]."""
        img = self.decode_unscaled(latent / self._scale())
        return img.clamp(-1, 1) if clamp else img

    def codebook_usage(self, stats, sizes) -> dict[str, float]:
        return {}  # continuous: no codebook

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Training (TokenizerModule): (unclamped reconstruction of a posterior sample, KL term, stats).

        The KL term is the per-image KL summed over the latent, divided by the image's element count: with the
        module's mean reconstruction loss, `aux_weight` is then LDM's `kl_weight` (1e-6 for kl-f16).
        """
        post = self.posterior(img)
        z = post.sample() if self.training else post.mean
        recon = self.decode_unscaled(z)
        kl = post.kl().mean() / img[0].numel()
        return recon, kl, {"posterior_std": post.std.detach().mean()}
