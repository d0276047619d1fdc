"""The one generation loop over scales (KV cache on, classifier-free guidance on the two halves of the batch)."""
from __future__ import annotations

from typing import Callable

import torch

from scalegen.generation.guidance import guidance_strength
from scalegen.schedule.anyscale import for_schedule

Inspect = Callable[[int, str, torch.Tensor], None]
Constrain = Callable[[int, torch.Tensor, "torch.Tensor | None"], tuple]


@torch.no_grad()
def generate(backbone, head, composition, labels: torch.Tensor, *, cfg: float = 1.5, cfg_schedule: str = "linear",
             generator: torch.Generator | None = None, inspect: Inspect | None = None, scales=None,
             ratio_steps: int | None = None, max_side: int | None = None, trained_sides=None,
             constrain: Constrain | None = None, **head_options) -> torch.Tensor:
    """Class labels (B,) -> the final latent state (what `composition.decode` turns into an image).

    The conditional and the null-class pass run as one batch of 2B; the head samples scale k's targets from
    them with guidance strength t_k (`head.sample`, options such as top_k/top_p/more_smooth or num_steps pass
    through), and the composition turns them into scale k+1's input. `inspect(si, name, tensor)` sees the
    intermediate tensors (parity tests, debugging).

    `scales` runs this call on another schedule: any steps, any final size (models whose parts allow it, see
    scalegen.schedule.anyscale). FlexVAR's rules, off by default (None or 0): the guidance ramp reaches cfg at step
    `ratio_steps` (si / min(S-1, ratio_steps), so longer lists go past cfg); scales larger than `max_side` get
    constant guidance and, like sides not in `trained_sides`, the head's `greedy_options` (if it has any).
    `constrain(si, targets, soft)` may replace sampled targets before they are used (scalegen.generation.editing).
    """
    composition, scales = for_schedule(scales, composition, backbone)  # refused before any compute
    B, S = labels.shape[0], len(scales)
    null = torch.full_like(labels, backbone.num_classes)
    x, cond = backbone.start(torch.cat((labels, null)), scales)
    state = composition.begin(B, labels.device)
    backbone.kv_caching(True)
    try:
        for si, (h, w) in enumerate(scales.sizes):
            ratio = si / min(S - 1, ratio_steps or S - 1) if S > 1 else 1.0
            beyond = bool(max_side) and max(h, w) > max_side  # past the largest trained scale (FlexVAR's max_pn)
            greedy = beyond or (bool(trained_sides) and not {h, w} <= set(trained_sides))
            strength = cfg if beyond else guidance_strength(cfg, ratio, cfg_schedule)
            hidden = backbone.step(x, cond, si, scales)
            see = (lambda name, t, si=si: inspect(si, name, t)) if inspect else None
            opts = {**head_options, **getattr(head, "greedy_options", {})} if greedy else head_options
            targets, soft = head.sample(hidden, cond, strength, ratio=ratio, si=si, size=(h, w), generator=generator,
                                        inspect=see, **opts)
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
