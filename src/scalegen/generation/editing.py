"""Image-to-image with any scale-wise model: refinement, in-painting, out-painting and expansion.

FlexVAR's paper shows these; its code ships none (the only entry point is models/flexvar.py autoregressive_infer_cfg), so this is our procedure: the
input image is tokenised at every scale of the schedule (`composition.targets`), and at each scale the tokens of
the known region come from it while only the others are sampled (`KnownTokens`, the `constrain` hook of
`scalegen.generation.loop.generate`); the next scale's input is built from the merged tokens, so the model sees the input
image wherever it is known. A token is known where its area is covered by the mask (share >= `threshold`);
refinement keeps the first `keep_scales` scales whole. Nothing here depends on the method: discrete or continuous
targets, residual or not (a model tied to its schedule only refuses another `scales`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scalegen.generation.options import GenerateOptions
from scalegen.io import resolve_path
from scalegen.schedule.anyscale import check_scales
from scalegen.schedule.scales import ScaleSchedule, area_down


def token_masks(mask: torch.Tensor | None, scales, batch: int = 1, threshold: float = 1.0,
                keep_scales: int = 0) -> list[torch.Tensor]:
    """Per scale, (B, h*w) bool: True where the token comes from the input: every token of the first `keep_scales`
    scales, elsewhere where `mask` (B,1,H,W) in [0,1] (1 = known) covers at least `threshold` of its area."""
    out = []
    for si, size in enumerate(ScaleSchedule.of(scales).sizes):
        if si < keep_scales or mask is None:
            keep = torch.full((batch, size[0] * size[1]), si < keep_scales, dtype=torch.bool)
        else:
            keep = area_down(mask.float(), size).flatten(1) >= threshold - 1e-6
        out.append(keep)
    return out


class KnownTokens:
    """The `constrain` hook: at scale si, the input's targets where `known`, the sampled ones elsewhere."""

    def __init__(self, targets: Sequence[torch.Tensor], known: Sequence[torch.Tensor]):
        self.targets, self.known = list(targets), list(known)

    def __call__(self, si: int, sampled: torch.Tensor, soft: torch.Tensor | None):
        gt, keep = self.targets[si].to(sampled.device), self.known[si].to(sampled.device)
        if gt.shape[0] != sampled.shape[0]:  # one input image for the whole batch
            gt, keep = gt.expand(sampled.shape[0], *gt.shape[1:]), keep.expand(sampled.shape[0], -1)
        keep_t = keep.view(*keep.shape, *([1] * (sampled.ndim - 2)))  # indices (B,n) or latents (B,n,C)
        merged = torch.where(keep_t, gt.to(sampled.dtype), sampled)
        if soft is not None:  # soft codes (more_smooth): the known tokens are exact one-hots
            soft = torch.where(keep[..., None], F.one_hot(gt, soft.shape[-1]).to(soft.dtype), soft)
        return merged, soft


@torch.no_grad()
def known_tokens(module, image: torch.Tensor, mask: torch.Tensor | None = None, *, scales=None, keep_scales: int = 0,
                 threshold: float = 1.0) -> KnownTokens:
    """The hook for `image` (B or 1, 3, H, W) in [-1, 1] at the size the schedule ends at (16 px per token for VQ-16)."""
    comp = module.composition.at(scales)  # the run's composition for that schedule
    latent = module.tokenizer.encode(image.float().to(module.device))
    if tuple(latent.shape[-2:]) != comp.scales.final:
        raise ValueError(f"edit.image: a {tuple(image.shape[-2:])} px image gives a {tuple(latent.shape[-2:])} latent, "
                         f"but the schedule ends at {comp.scales.final}: resize the image or set scales")
    targets = comp.targets(latent)
    known = token_masks(mask, comp.scales, image.shape[0], threshold, keep_scales)
    return KnownTokens(targets, known)


def expand_canvas(image: torch.Tensor, pad: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas, mask): the image placed on a larger canvas (top, bottom, left, right px of new area), mask 1 on it."""
    top, bottom, left, right = (int(p) for p in pad)
    canvas = F.pad(image, (left, right, top, bottom), value=0.0)
    mask = F.pad(torch.ones_like(image[:, :1]), (left, right, top, bottom), value=0.0)
    return canvas, mask


def stretched(scales, final: tuple[int, int]) -> list[tuple[int, int]]:
    """A schedule resized to end at `final` (the first scale kept: it holds the start token), repeats dropped."""
    sched = ScaleSchedule.of(scales)
    H, W = sched.final
    out = [sched.sizes[0]]
    for h, w in sched.sizes[1:]:
        size = (max(1, round(h * final[0] / H)), max(1, round(w * final[1] / W)))
        if size != out[-1] and size[0] * size[1] > out[-1][0] * out[-1][1]:
            out.append(size)
    if out[-1] != tuple(final):
        out.append(tuple(final))
    return out


@torch.no_grad()
def edit(module, image: torch.Tensor, labels, mask: torch.Tensor | None = None, *, keep_scales: int = 0,
         threshold: float = 1.0, scales=None, seed: int | None = None, **options) -> torch.Tensor:
    """Images in [0, 1] for `labels`, from `image` in [-1, 1]: refinement (keep_scales > 0, no mask),
    in-painting / out-painting (mask: 1 = keep), expansion (a canvas and mask from `expand_canvas`, with `scales`
    ending at the canvas's latent size, e.g. `stretched(...)`). Other sampling options (cfg_scale, top_k, ...) as
    `GeneratorModule.generate`, checked into its typed options."""
    hook = known_tokens(module, image, mask, scales=scales, keep_scales=keep_scales, threshold=threshold)
    return module.generate(labels, seed=seed, scales=scales, constrain=hook, **options)


# -- sample.py: the `edit` group -----------------------------------------------------------------------------------


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], resized (bicubic) to `size` (h, w)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"edit.image: no such file {path}")
    img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0).float().div(127.5).sub(1)


def load_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) in [0, 1]: white = keep the input, black = generate."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"edit.mask: no such file {path}")
    mask = Image.open(path).convert("L").resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy(np.array(mask)).float().div(255).view(1, 1, *size)


def edit_options(cfg, module, options: GenerateOptions) -> tuple[GenerateOptions, KnownTokens | None]:
    """sample.py's `edit` group: the options to draw with (the model's schedule stretched to an expanded canvas) and
    the known-tokens hook (None: class-conditional sampling). Every schedule is checked before any image is drawn."""
    parts = (module.generator.backbone, module.composition)
    check_scales(options.scales, *parts)
    edit_cfg = cfg.get("edit") or {}
    if not edit_cfg.get("image"):
        return options, None
    scales = options.scales
    down = module.tokenizer.downsample
    final = (module.composition.scales if scales is None else scales).final
    size = (final[0] * down, final[1] * down)
    mask, expand = None, edit_cfg.get("expand")
    if expand:
        top, bottom, left, right = (int(p) for p in expand)
        if any(p % down for p in expand):
            raise ValueError(f"edit.expand={list(expand)}: each side must be a multiple of {down} px (one token)")
        inner = size if scales is None else (size[0] - top - bottom, size[1] - left - right)
        image, mask = expand_canvas(load_image(resolve_path(edit_cfg.image), inner), expand)
        if scales is None:  # the model's list, stretched to end at the canvas
            canvas = (image.shape[-2] // down, image.shape[-1] // down)
            scales = ScaleSchedule.of(stretched(module.composition.scales, canvas))
            check_scales(scales, *parts)
    else:
        image = load_image(resolve_path(edit_cfg.image), size)
    if edit_cfg.get("mask"):
        mask = load_mask(resolve_path(edit_cfg.mask), tuple(image.shape[-2:]))
    if mask is None and not edit_cfg.get("keep_scales"):
        raise ValueError("edit.image is used only with edit.mask (in-/out-painting), edit.keep_scales (refinement) "
                         "or edit.expand (expansion): give one")
    hook = known_tokens(module, image, mask, scales=scales, keep_scales=edit_cfg.get("keep_scales") or 0,
                        threshold=edit_cfg.get("threshold", 1.0))
    return replace(options, scales=scales), hook
