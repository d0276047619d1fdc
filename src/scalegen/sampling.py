"""The one generation loop over scales (KV cache on, classifier-free guidance on the two halves of the batch)."""
from __future__ import annotations

from typing import Callable

import torch

from .guidance import guidance_strength

Inspect = Callable[[int, str, torch.Tensor], None]


@torch.no_grad()
def generate(backbone, head, composition, labels: torch.Tensor, *, cfg: float = 1.5, cfg_schedule: str = "linear",
             generator: torch.Generator | None = None, inspect: Inspect | None = None, **head_options) -> torch.Tensor:
    """Class labels (B,) -> the final latent state (what `composition.decode` turns into an image).

    The conditional and the null-class pass run as one batch of 2B; the head samples scale k's targets from
    them with guidance strength t_k (`head.sample`, options such as top_k/top_p/more_smooth or num_steps pass
    through), and the composition turns them into scale k+1's input. `inspect(si, name, tensor)` sees the
    intermediate tensors (parity tests, debugging).
    """
    B, S = labels.shape[0], len(composition.scales)
    null = torch.full_like(labels, backbone.num_classes)
    x, cond = backbone.start(torch.cat((labels, null)))
    state = composition.begin(B, labels.device)
    backbone.kv_caching(True)
    try:
        for si in range(S):
            ratio = si / (S - 1) if S > 1 else 1.0
            hidden = backbone.step(x, cond)
            see = (lambda name, t, si=si: inspect(si, name, t)) if inspect else None
            targets, soft = head.sample(hidden, cond, guidance_strength(cfg, ratio, cfg_schedule), ratio=ratio,
                                        generator=generator, inspect=see, **head_options)
            state, nxt = composition.advance(si, state, targets, soft)
            if nxt is not None:
                x = backbone.embed_scale(si + 1, nxt).repeat(2, 1, 1)
    finally:
        backbone.kv_caching(False)
    return state


def random_labels(batch: int, num_classes: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform class labels drawn as the official sampler does (one multinomial over a (1, classes) row)."""
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device)
    return torch.multinomial(uniform, num_samples=batch, replacement=True, generator=generator).reshape(batch)
