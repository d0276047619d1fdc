"""Multi-scale residual VQVAE (VAR, M-VAR): one codebook shared by K token maps, coarse to fine.

Encoding quantises the residual at each scale (area-down), upsamples the chosen codes to the latent size
(bicubic), refines them with a phi conv and subtracts them from the residual. The generator is taught from the
area-downsampled running sum f_hat of coarser scales (VAR paper, Alg. 1-2; VAR's models/quant.py:15-196).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from scalegen.schedule.scales import VAR_256, ScaleSchedule, area_down, bicubic_up
from scalegen.tokenizers.blocks import Decoder, Encoder

# The released 4-phi model at 10 scales: scales 2 and 7 are exact ties between two ticks, resolved this way by
# the official float64 numpy argmin; a float32 recomputation flips them, so the table is pinned.
_PINNED_PHI_TABLES = {(4, 10): (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)}


def phi_table(num_phi: int, num_scales: int) -> tuple[int, ...]:
    """Which phi conv each scale uses: the nearest of `num_phi` evenly spaced ticks to si/(S-1)."""
    if (num_phi, num_scales) in _PINNED_PHI_TABLES:
        return _PINNED_PHI_TABLES[num_phi, num_scales]
    if num_phi == 1 or num_scales == 1:
        return (0,) * num_scales
    margin = 1 / (3 * num_phi) if num_phi == 4 else 1 / (2 * num_phi)
    ticks = np.linspace(margin, 1 - margin, num_phi)
    return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the per-scale refinement of upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int = 4096, channels: int = 32, scales: Sequence = VAR_256, beta: float = 0.25,
                 using_znorm: bool = False, quant_resi: float = 0.5, share_quant_resi: int = 4,
                 default_qresi_counts: int = 0, restart_dead_codes: int = 0):
        super().__init__()
        # every N training steps, codes no scale has used lately restart at residual vectors of the batch
        # (0 = never, the official behaviour); against the codebook collapse VAR's users report (VAR issue #54)
        self.restart_dead_codes = restart_dead_codes
        self.vocab_size, self.channels, self.beta, self.using_znorm = vocab_size, channels, beta, using_znorm
        self.scales, self.share_quant_resi = ScaleSchedule.of(scales), share_quant_resi
        # share_quant_resi: 0 = one phi per scale, 1 = one shared phi, K >= 2 = K phis shared by nearby scales
        num_phi = (default_qresi_counts or len(self.scales)) if share_quant_resi == 0 else share_quant_resi
        make = (lambda: Phi(channels, quant_resi)) if abs(quant_resi) > 1e-6 else nn.Identity
        self.phi = nn.ModuleList(make() for _ in range(num_phi))
        self.embedding = nn.Embedding(vocab_size, channels)
        # per-scale codebook usage, an EMA of hit counts; only tokenizer training reads it
        self.register_buffer("usage_ema", torch.zeros(len(self.scales), vocab_size))
        self.record_hit = 0

    def phis(self, num_scales: int) -> list[nn.Module]:
        return [self.phi[i] for i in phi_table(len(self.phi), num_scales)]

    # -- lookup -------------------------------------------------------------------------------------------------
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) -> (B*h*w,) code indices, row-major (b, y, x)."""
        z_nc = z.permute(0, 2, 3, 1).reshape(-1, self.channels)
        codes = self.embedding.weight.data
        if self.using_znorm:  # cosine lookup; the code itself stays un-normalised
            return torch.argmax(F.normalize(z_nc, dim=-1) @ F.normalize(codes.T, dim=0), dim=1)
        # same expression order as the official code: argmin ties must break the same way
        dist_ = torch.sum(z_nc.square(), dim=1, keepdim=True) + torch.sum(codes.square(), dim=1, keepdim=False)
        dist_.addmm_(z_nc, codes.T, alpha=-2, beta=1)
        return torch.argmin(dist_, dim=1)

    def embed(self, idx: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, h*w) indices -> (B, C, h, w) codes (channels-last strides, as the official embedding view)."""
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.channels, *size)

    # -- encoding -----------------------------------------------------------------------------------------------
    def quantize(self, f: torch.Tensor, scales=None, to_fhat: bool = False) -> list[torch.Tensor]:
        """Latent f -> per-scale indices (B, h*w), or the running f_hat after each scale."""
        sched = ScaleSchedule.of(scales or self.scales)
        B, C, H, W = f.shape
        sched.check_final((H, W))
        rest, f_hat, out = f.detach().clone(), torch.zeros_like(f), []
        for (h, w), phi, last in zip(sched.sizes, self.phis(len(sched)), _last_flags(len(sched))):
            idx = self.nearest(rest if last else area_down(rest, (h, w)))
            codes = self.embedding(idx.view(B, h, w)).permute(0, 3, 1, 2)
            codes = phi((codes if last else bicubic_up(codes, (H, W))).contiguous())
            f_hat.add_(codes)
            rest.sub_(codes)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, h * w))
        return out

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Tokenizer training: straight-through f_hat, the VQ loss, and per-scale hit counts (V,)."""
        f = f.float()
        B, C, H, W = f.shape
        f_no_grad = f.detach()
        rest, f_hat = f_no_grad.clone(), torch.zeros_like(f)
        loss, hits, residuals = 0.0, [], []
        sched = self.scales
        for si, ((h, w), phi, last) in enumerate(zip(sched.sizes, self.phis(len(sched)), _last_flags(len(sched)))):
            z = rest if last else area_down(rest, (h, w))
            idx = self.nearest(z)
            if self.restart_dead_codes:
                residuals.append(z.detach().permute(0, 2, 3, 1).reshape(-1, C))
            hit = idx.bincount(minlength=self.vocab_size).float()
            if self.training and dist.is_available() and dist.is_initialized():
                dist.all_reduce(hit)
            hits.append(hit)
            codes = self.embedding(idx.view(B, h, w)).permute(0, 3, 1, 2)
            codes = phi((codes if last else bicubic_up(codes, (H, W))).contiguous())
            f_hat = f_hat + codes
            rest -= codes
            # commitment (beta) + codebook term, which flows through the bicubic and phi
            loss += F.mse_loss(f_hat.data, f).mul_(self.beta) + F.mse_loss(f_hat, f_no_grad)
            if self.training:
                self._record(si, hit)
        loss *= 1.0 / len(sched)
        f_hat = (f_hat.data - f_no_grad).add_(f)  # straight-through estimator
        if self.training and self.restart_dead_codes and self.record_hit % self.restart_dead_codes == 0:
            self._restart(torch.cat(residuals))
        return f_hat, loss, hits

    @torch.no_grad()
    def _restart(self, candidates: torch.Tensor) -> None:
        usage = self.usage_ema.sum(0)
        dead = torch.nonzero(usage < 0.01 * usage.mean()).flatten()
        if len(dead) == 0:
            return
        if dist.is_available() and dist.is_initialized():  # every rank must restart to the same vectors
            gathered = [torch.empty_like(candidates) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, candidates.contiguous())
            candidates = torch.cat(gathered)
            pick = torch.randint(len(candidates), (len(dead),), device=candidates.device)
            dist.broadcast(pick, 0)
        else:
            pick = torch.randint(len(candidates), (len(dead),), device=candidates.device)
        self.embedding.weight.data[dead] = candidates[pick]
        self.usage_ema[:, dead] = self.usage_ema.mean()  # give them time to be used before the next check

    @torch.no_grad()
    def _record(self, si: int, hit: torch.Tensor) -> None:
        momentum = 0.0 if self.record_hit == 0 else (0.9 if self.record_hit < 100 else 0.99)
        self.usage_ema[si].mul_(momentum).add_(hit, alpha=1 - momentum)
        if si == len(self.scales) - 1:
            self.record_hit += 1

    def usage_percent(self, tokens_per_image_step: int, world_size: int = 1) -> list[float]:
        """Share of codes hit more than 8% of uniform use, per scale (the official `usages`)."""
        margin = world_size * tokens_per_image_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.usage_ema]

    # -- decoding and generation --------------------------------------------------------------------------------
    def embed_to_fhat(self, codes: list[torch.Tensor], scales=None, all_to_max_scale: bool = True) -> list[torch.Tensor]:
        """Per-scale codes (B,C,h,w) -> the running f_hat after each scale (at the latent size by default)."""
        sched = ScaleSchedule.of(scales or self.scales)
        B, H, W = codes[0].shape[0], *sched.final
        out = []
        if all_to_max_scale:
            f_hat = codes[0].new_zeros(B, self.channels, H, W, dtype=torch.float32)
            for h, phi, last in zip(codes, self.phis(len(sched)), _last_flags(len(sched))):
                f_hat.add_(phi(h if last else bicubic_up(h, (H, W))))
                out.append(f_hat.clone())
        else:  # the official "experimental" path: accumulate at each scale's own size
            f_hat = codes[0].new_zeros(B, self.channels, *sched.sizes[0], dtype=torch.float32)
            for size, h, phi in zip(sched.sizes, codes, self.phis(len(sched))):
                f_hat = bicubic_up(f_hat, size)
                f_hat.add_(phi(h))
                out.append(f_hat)
        return out

    def teacher_inputs(self, idx: list[torch.Tensor], scales=None) -> torch.Tensor:
        """Indices of every scale -> generator inputs for scales 1..K-1: area(f_hat of coarser scales), (B, L-n0, C)."""
        sched = ScaleSchedule.of(scales or self.scales)
        B, (H, W) = idx[0].shape[0], sched.final
        f_hat = idx[0].new_zeros(B, self.channels, H, W, dtype=torch.float32)
        out = []
        for si, phi in zip(range(len(sched) - 1), self.phis(len(sched))):
            f_hat.add_(phi(bicubic_up(self.embed(idx[si], sched.sizes[si]), (H, W))))
            out.append(area_down(f_hat, sched.sizes[si + 1]).view(B, self.channels, -1).transpose(1, 2))
        return torch.cat(out, dim=1) if out else f_hat.new_zeros(B, 0, self.channels)

    def next_input(self, si: int, f_hat: torch.Tensor, codes: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generation: add scale si's codes (B,C,h,w) to f_hat in place; return it and the next scale's input map."""
        sched = ScaleSchedule.of(scales or self.scales)
        phi = self.phis(len(sched))[si]
        if si == len(sched) - 1:
            f_hat.add_(phi(codes))
            return f_hat, None
        f_hat.add_(phi(bicubic_up(codes, sched.final)))
        return f_hat, area_down(f_hat, sched.sizes[si + 1])


def _last_flags(n: int) -> list[bool]:
    return [i == n - 1 for i in range(n)]


class MultiScaleVQVAE(nn.Module):
    """VAR's `VQVAE`: encoder -> 3x3 quant_conv -> multi-scale residual quantizer -> 3x3 post_quant_conv -> decoder."""

    discrete = True
    residual = True
    stochastic = False
    statistics = ("quantize.usage_ema",)  # per-scale codebook usage: the weights load under another scale list

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, dropout: float = 0.0, beta: float = 0.25, using_znorm: bool = False,
                 quant_conv_ks: int = 3, quant_resi: float = 0.5, share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence = VAR_256, using_sa: bool = True, using_mid_sa: bool = True,
                 in_channels: int = 3, norm_groups: int = 32, restart_dead_codes: int = 0):
        super().__init__()
        conv = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels, in_channels=in_channels,
                    dropout=dropout, using_sa=using_sa, using_mid_sa=using_mid_sa, norm_groups=norm_groups)
        self.encoder, self.decoder = Encoder(**conv), Decoder(**conv)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.vocab_size, self.latent_channels = vocab_size, z_channels
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, v_patch_nums, beta, using_znorm, quant_resi,
                                            share_quant_resi, default_qresi_counts, restart_dead_codes)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)

    @property
    def scales(self) -> ScaleSchedule:
        return self.quantize.scales

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Image in [-1,1] -> continuous latent f (B, C, H/16, W/16), before quantisation."""
        return self.quant_conv(self.encoder(img))

    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        img = self.decoder(self.post_quant_conv(latent))
        return img.clamp_(-1, 1) if clamp else img

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training: (unclamped reconstruction, vq loss, per-scale hit counts)."""
        f_hat, vq_loss, hits = self.quantize(self.encode(img))
        return self.decode(f_hat, clamp=False), vq_loss, hits

    def codebook_usage(self, hits: list[torch.Tensor], sizes: list[tuple[int, int]]) -> dict[str, float]:
        """Per scale of the schedule, the official `usages` (the finest scale's hits count every token of the step)."""
        usage = self.quantize.usage_percent(int(hits[-1].sum().item()))
        return {f"usage_s{k}": pct for k, pct in enumerate(usage)}

    # -- the seam used by the generator (see scalegen.schedule.residual) ---------------------------------------------
    def img_to_idx(self, img: torch.Tensor, scales=None) -> list[torch.Tensor]:
        return self.quantize.quantize(self.encode(img), scales)

    def idx_to_img(self, idx: list[torch.Tensor], scales=None) -> torch.Tensor:
        sched = ScaleSchedule.of(scales or self.scales)
        codes = [self.quantize.embed(i, s) for i, s in zip(idx, sched.sizes)]
        return self.decode(self.quantize.embed_to_fhat(codes, sched)[-1])
