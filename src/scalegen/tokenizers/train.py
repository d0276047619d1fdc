"""Tokenizer training: reconstruction + tokenizer aux loss + LPIPS + PatchGAN hinge, the VQGAN recipe.

VAR describes an L2 + perceptual + GAN compound loss but released no tokenizer training (its vqvae.py:56-59 and quant.py:52-104 hold only the VQ loss).
Any tokenizer whose `forward(img)` returns `(recon, aux_loss, stats)` trains here: the VQ tokenizers return their
VQ loss and per-scale hit counts, a KL VAE its KL term; `recon` may be a list, one per scale (FlexVAE).
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from scalegen.tokenizers.losses import PatchDiscriminator, Perceptual, hinge_d_loss


def psnr(recon: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], measured on [0, 1] and averaged over the batch."""
    mse = ((recon.detach().clamp(-1, 1) - img) / 2).square().flatten(1).mean(dim=1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


@contextmanager
def _frozen(module: nn.Module):
    """No parameter of `module` joins the graph built inside; its other uses keep their gradients."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _decoder_out(tokenizer: nn.Module) -> nn.Conv2d | None:
    conv = getattr(getattr(tokenizer, "decoder", None), "conv_out", None)
    return conv if isinstance(conv, nn.Conv2d) else None


class TokenizerModule(L.LightningModule):
    """Trains a tokenizer on `(images in [-1, 1], labels)` batches.

    The generator loss is `recon_weight * recon + perceptual_weight * LPIPS + aux_weight * aux + d_weight * g_adv`,
    where `d_weight = disc_weight * (adaptive ratio or 1)` from step `disc_start` on (0 before). The tokenizer and
    the discriminator share one AdamW with two parameter groups and one backward (the discriminator is frozen
    while the generator's adversarial term is built): this equals the two-optimizer GAN step, and Lightning's
    `global_step`, `max_steps`, gradient accumulation and mixed precision then count and work per batch.
    Gradient clipping is `grad_clip` on each model separately (Trainer's gradient_clip_val is not used).
    Under DDP with `disc_start > 0` the discriminator has no gradient at first: use `ddp_find_unused_parameters_true`.
    """

    def __init__(self, tokenizer: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9),
                 weight_decay: float = 0.0, warmup_steps: int = 0, recon_loss: str = "l2", recon_weight: float = 1.0,
                 aux_weight: float = 1.0, perceptual_weight: float = 0.0, perceptual_weights: str | None = None,
                 disc_weight: float = 0.0, disc_start: int = 0, disc_lr: float | None = None, disc_ch: int = 64,
                 disc_layers: int = 3, adaptive_disc_weight: bool = True, grad_clip: float = 1.0,
                 num_val_images: int = 8):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss={recon_loss!r}: allowed values are 'l1' and 'l2'")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.perceptual = Perceptual(perceptual_weights) if perceptual_weight > 0 else None
        self.discriminator = None
        if disc_weight > 0:
            if adaptive_disc_weight and _decoder_out(tokenizer) is None:
                raise ValueError("adaptive_disc_weight=True needs the decoder's last conv at tokenizer.decoder."
                                 f"conv_out ({type(tokenizer).__name__} has none); set adaptive_disc_weight=False")
            out = _decoder_out(tokenizer)
            self.discriminator = PatchDiscriminator(out.out_channels if out is not None else 3, disc_ch, disc_layers)
        self._val_images: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- losses --------------------------------------------------------------------------------------------------
    def _recon_loss(self, recon: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(recon, img) if self.hparams.recon_loss == "l1" else F.mse_loss(recon, img)

    def _adversarial_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start

    def _adaptive_weight(self, nll: torch.Tensor, g_adv: torch.Tensor) -> torch.Tensor:
        """VQGAN: the GAN term weighed by the ratio of gradient norms (recon / GAN) at the decoder's last layer."""
        if not self.hparams.adaptive_disc_weight:
            return torch.ones((), device=nll.device)
        last = _decoder_out(self.tokenizer).weight
        nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
        adv_grad, = torch.autograd.grad(g_adv, last, retain_graph=True)
        return (nll_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    # -- steps ---------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        img = batch[0]
        hp = self.hparams
        recon, aux, stats = self.tokenizer(img)
        # a multi-scale tokenizer (FlexVAE) gives one reconstruction per scale, coarse to fine: each is compared with
        # the image area-resized to its size; the adversarial term and the logged PSNR use the finest
        recons = list(recon) if isinstance(recon, (list, tuple)) else [recon]
        recon = recons[-1]
        targets = [img if r.shape[-2:] == img.shape[-2:] else F.interpolate(img, size=r.shape[-2:], mode="area")
                   for r in recons]
        aux = torch.as_tensor(aux, dtype=torch.float32, device=recon.device)  # a tokenizer may return a plain 0.0
        rec = sum(self._recon_loss(r, t) for r, t in zip(recons, targets)) / len(recons)
        nll = hp.recon_weight * rec
        logs = {"train/recon": rec, "train/aux": aux}
        if self.perceptual is not None:
            perceptual = sum(self.perceptual(r, t).mean() for r, t in zip(recons, targets)) / len(recons)
            nll = nll + hp.perceptual_weight * perceptual
            logs["train/perceptual"] = perceptual
        loss = nll + hp.aux_weight * aux
        d_loss = None
        if self._adversarial_on():
            with _frozen(self.discriminator):  # the discriminator learns only from its own loss below
                g_adv = -self.discriminator(recon).mean()
            d_weight = hp.disc_weight * self._adaptive_weight(nll, g_adv)
            loss = loss + d_weight * g_adv
            d_loss = hinge_d_loss(self.discriminator(img), self.discriminator(recon.detach()))
            logs.update({"train/g_adv": g_adv, "train/d_weight": d_weight, "train/d_loss": d_loss})

        batch_size = img.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/psnr", psnr(recon, img), prog_bar=True, batch_size=batch_size)
        self.log_dict({k: v.detach() for k, v in logs.items()}, batch_size=batch_size)
        down = self.tokenizer.downsample  # each reconstruction's token-map size, coarse to fine
        usage = self.tokenizer.codebook_usage(stats, [(r.shape[-2] // down, r.shape[-1] // down) for r in recons])
        self.log_dict({f"train/{k}": pct for k, pct in usage.items()}, batch_size=batch_size)
        return loss if d_loss is None else loss + d_loss

    def validation_step(self, batch, batch_idx: int) -> None:
        img = batch[0]
        recon = self.tokenizer(img)[0].clamp(-1, 1)  # eval mode: the full encode -> quantize -> decode path
        batch_size = img.shape[0]
        self.log("val/recon", self._recon_loss(recon, img), sync_dist=True, batch_size=batch_size)
        self.log("val/psnr", psnr(recon, img), prog_bar=True, sync_dist=True, batch_size=batch_size)
        if batch_idx == 0:
            n = self.hparams.num_val_images
            self._val_images = (img[:n].detach().cpu(), recon[:n].detach().cpu())

    def on_validation_epoch_end(self) -> None:
        images, self._val_images = self._val_images, None
        if images is None or self.trainer.sanity_checking:
            return
        out_dir = self.trainer.log_dir or self.trainer.default_root_dir  # every rank: log_dir is a collective
        if self.trainer.is_global_zero:
            nrow = math.ceil(math.sqrt(images[0].shape[0]))
            originals, recons = (make_grid(x.float().add(1).div(2), nrow=nrow) for x in images)
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"recon_epoch{self.current_epoch}.png")
            save_image(torch.cat([originals, recons], dim=-1), path)  # originals | reconstructions

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [p for p in self.tokenizer.parameters() if p.requires_grad], "lr": hp.lr}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()),
                           "lr": hp.disc_lr if hp.disc_lr is not None else hp.lr})
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # runs after AMP unscaling; the two models are clipped apart, as with two optimizers
        if self.hparams.grad_clip > 0:
            for model in (self.tokenizer, self.discriminator):
                if model is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.hparams.grad_clip)

    # -- checkpoints: the frozen LPIPS net is a fixed metric, not training state -----------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("perceptual.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.perceptual is not None:
            checkpoint["state_dict"].update({f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()})
