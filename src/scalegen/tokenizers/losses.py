"""Losses for tokenizer training: the PatchGAN discriminator with its hinge loss, and LPIPS-VGG16 (the VQGAN recipe).

VAR trains its VQVAE with L2 + perceptual + GAN losses (paper sec. 3) but released no training code
(VAR's vqvae.py:56-59 and quant.py:52-104 are all the training code it has); these follow taming-transformers / LPIPS, which the paper builds on.

Nothing here downloads: `Perceptual` reads one local file. Build it once from the two official files with

    python -m scalegen.tokenizers.losses --vgg vgg16-397923af.pth --lpips vgg.pth --out lpips_vgg16.safetensors
"""
from __future__ import annotations

import argparse
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# -- discriminator ---------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Sequential):
    """pix2pix's NLayerDiscriminator: 4x4 convs, stride 2 then 1, BatchNorm, LeakyReLU(0.2); one logit per patch."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        widths = [ch * min(2**n, 8) for n in range(n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(widths[n]), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        super().__init__(*layers)
        for m in self.modules():  # the DCGAN init that taming and pix2pix use
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss; the generator's counterpart is -logits_fake.mean()."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# -- LPIPS -----------------------------------------------------------------------------------------------------

# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: these indices of torchvision's vgg16().features
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)

# official name -> Perceptual name. The file format is torchvision's `features.{i}.weight/bias` (the conv layers
# of vgg16().features[:30]) plus `lin{k}.weight` (1, C_k, 1, 1) for k = 0..4, the LPIPS layer weights.
_RENAMES = (
    (r"features\.(\d+)\.(weight|bias)", r"features.\1.\2"),  # torchvision vgg16-397923af.pth
    (r"lin(\d)\.model\.1\.weight", r"lin\1.weight"),  # lpips/weights/v0.1/vgg.pth (Sequential(Dropout, Conv))
    (r"lin(\d)\.weight", r"lin\1.weight"),
    (r"net\.slice\d\.(\d+)\.(weight|bias)", r"features.\1.\2"),  # taming's vgg_lpips (VGG bundled as net.slice*)
)

_HOW_TO_BUILD = (
    "Perceptual loss reads one local file holding the VGG16 features and the LPIPS linear layers; nothing is "
    "downloaded at run time. Get torchvision's VGG16 weights (vgg16-397923af.pth, from "
    "https://download.pytorch.org/models/vgg16-397923af.pth) and LPIPS's vgg.pth (lpips/weights/v0.1/vgg.pth in "
    "the `lpips` package or github.com/richzhang/PerceptualSimilarity), then run\n"
    "    python -m scalegen.tokenizers.losses --vgg vgg16-397923af.pth --lpips vgg.pth --out lpips_vgg16.safetensors\n"
    "and pass that path as perceptual_weights (or set perceptual_weight=0)."
)


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class Perceptual(nn.Module):
    """LPIPS (Zhang et al. 2018) with VGG16, frozen. Images in [-1, 1], at least 16x16; one distance per image, (B,).

    `weights` is the path of the file described at `_RENAMES` (safetensors, or a torch pickle), or its state dict.
    """

    def __init__(self, weights: str | os.PathLike | dict[str, torch.Tensor] | None):
        super().__init__()
        if not isinstance(weights, dict):
            if weights is None or not os.path.isfile(weights):
                raise FileNotFoundError(f"LPIPS weights file not found: {weights!r}. {_HOW_TO_BUILD}")
            weights = _load_state(weights)
        # built on the meta device: every weight comes from the file, so skip the random init of 138M parameters
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features[: _TAPS[-1] + 1]
        self.features = features.to_empty(device="cpu")
        for k, channels in enumerate(_TAP_CHANNELS):
            setattr(self, f"lin{k}", nn.Conv2d(channels, 1, 1, bias=False))
        # LPIPS's ScalingLayer: maps [-1, 1] images to the ImageNet statistics VGG was trained on
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        try:
            self.load_state_dict(weights)
        except RuntimeError as e:
            raise RuntimeError(f"LPIPS weights do not fit Perceptual: {e}\n{_HOW_TO_BUILD}") from None
        self.requires_grad_(False)  # a fixed metric; train/eval mode is the same (no dropout, no batch norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = (torch.cat([x, y]) - self.shift) / self.scale  # one VGG pass for both images
        dist = x.new_zeros(x.shape[0])
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == _TAPS[k]:
                f = h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                fx, fy = f.chunk(2)
                dist = dist + getattr(self, f"lin{k}")((fx - fy).square()).mean(dim=(1, 2, 3))
                k += 1
        return dist


def build_lpips_weights(lpips_path: str, out_path: str, vgg_path: str | None = None) -> dict[str, torch.Tensor]:
    """Write the one file `Perceptual` reads, from torchvision's VGG16 state dict and LPIPS's linear layers.

    `vgg_path` is not needed when the LPIPS file already bundles the VGG (taming's `vgg_lpips`). Returns the state.
    """
    sources = ([vgg_path] if vgg_path else []) + [lpips_path]
    state = {}
    for path in sources:
        for name, tensor in _load_state(path).items():
            for pattern, target in _RENAMES:
                if re.fullmatch(pattern, name):
                    new = re.sub(pattern, target, name)
                    if not new.startswith("features.") or int(new.split(".")[1]) <= _TAPS[-1]:
                        state[new] = tensor.float().contiguous()
                    break
    Perceptual(state)  # raises, naming the missing and unexpected keys, if the files don't fit
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file(state, out_path)
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the LPIPS-VGG16 weights file of scalegen's Perceptual loss.")
    parser.add_argument("--vgg", help="torchvision vgg16 state dict (vgg16-397923af.pth)")
    parser.add_argument("--lpips", required=True, help="LPIPS linear layers (lpips/weights/v0.1/vgg.pth)")
    parser.add_argument("--out", required=True, help="output file, e.g. lpips_vgg16.safetensors")
    args = parser.parse_args(argv)
    build_lpips_weights(args.lpips, args.out, args.vgg)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
