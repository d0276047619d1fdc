"""The one generation loop over scales (KV cache on, classifier-free guidance on the two halves of the batch)."""
from __future__ import annotations

from typing import Callable

import torch

from scalegen.generation.options import GenerateOptions
from scalegen.parts import Backbone, Composition, Head
from scalegen.schedule.anyscale import for_schedule

Inspect = Callable[[int, str, torch.Tensor], None]
Constrain = Callable[[int, torch.Tensor, "torch.Tensor | None"], tuple]


@torch.no_grad()
def generate(backbone: Backbone, head: Head, composition: Composition, labels: torch.Tensor, options: GenerateOptions | None = None, *,
             generator: torch.Generator | None = None, inspect: Inspect | None = None,
             constrain: Constrain | None = None) -> torch.Tensor:
    """Class labels (B,) -> the final latent state (what `composition.decode` turns into an image).

    The conditional and the null-class pass run as one batch of 2B; at scale k the head samples the targets from
    them, mixed as `options.guidance.at(k, S, size)` says, with its own options (greedy ones where FlexVAR's rules
    say so), and the composition turns them into scale k+1's input. `options.scales` runs this call on another
    schedule: any steps, any final size (models whose parts allow it, see scalegen.schedule.anyscale).
    `inspect(si, name, tensor)` sees the intermediate tensors (parity tests, debugging); `constrain(si, targets,
    soft)` may replace sampled targets before they are used (scalegen.generation.editing).
    """
    options = GenerateOptions() if options is None else options
    composition, scales = for_schedule(options.scales, composition, backbone)  # refused before any compute
    sampling, greedy = options.head_options(head)
    B, S = labels.shape[0], len(scales)
    null = torch.full_like(labels, backbone.num_classes)
    x, cond = backbone.start(torch.cat((labels, null)), scales)
    state = composition.begin(B, labels.device)
    backbone.kv_caching(True)
    try:
        for si, size in enumerate(scales.sizes):
            guidance = options.guidance.at(si, S, size)
            hidden = backbone.step(x, cond, si, scales)
            see = (lambda name, t, si=si: inspect(si, name, t)) if inspect else None
            opts = greedy if options.greedy(size, guidance) else sampling
            targets, soft = head.sample(hidden, cond, guidance, opts, si=si, size=size, generator=generator,
                                        inspect=see)
            if constrain is not None:
                targets, soft = constrain(si, targets, soft)
            state, nxt = composition.advance(si, state, targets, soft)
            if nxt is not None:
                x = backbone.embed_scale(si + 1, nxt, scales).repeat(2, 1, 1)
    finally:
        backbone.kv_caching(False)
    return state


def random_labels(batch: int, num_classes: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform class labels drawn as the official sampler does (one multinomial over a (1, classes) row)."""
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device)
    return torch.multinomial(uniform, num_samples=batch, replacement=True, generator=generator).reshape(batch)
