"""The one generation loop over scales (KV cache on, classifier-free guidance on the two halves of the batch)."""
from __future__ import annotations

from typing import Callable

import torch

from .guidance import guidance_strength, guide
from .heads.categorical import gumbel_soft, sample_tokens, smooth_tau

Inspect = Callable[[int, str, torch.Tensor], None]


@torch.no_grad()
def generate(backbone, head, composition, labels: torch.Tensor, *, cfg: float = 1.5, cfg_schedule: str = "linear",
             top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, generator: torch.Generator | None = None,
             inspect: Inspect | None = None) -> torch.Tensor:
    """Class labels (B,) -> the final latent (what the tokenizer decodes).

    The conditional and the null-class pass run as one batch of 2B. `more_smooth` (VAR's visualisation trick,
    never used for FID) feeds a Gumbel-soft mix of codes instead of the sampled ones. `inspect(si, name, t)`
    sees the intermediate tensors (used by the parity tests and debugging).
    """
    B, S = labels.shape[0], len(composition.scales)
    null = torch.full_like(labels, backbone.num_classes)
    x, cond = backbone.start(torch.cat((labels, null)))
    state = composition.begin(B, labels.device)
    backbone.kv_caching(True)
    try:
        for si in range(S):
            ratio = si / (S - 1) if S > 1 else 1.0
            logits = head(backbone.step(x, cond), cond)
            logits = guide(logits[:B], logits[B:], guidance_strength(cfg, ratio, cfg_schedule))
            if inspect:
                inspect(si, "logits_cfg", logits)
            idx = sample_tokens(logits, top_k, top_p, generator)  # masks `logits` in place
            soft = gumbel_soft(logits.mul(1 + ratio), smooth_tau(ratio), generator) if more_smooth else None
            if inspect:
                inspect(si, "logits_masked", logits)
                inspect(si, "idx", idx)
            state, nxt = composition.advance(si, state, idx, soft)
            if nxt is not None:
                x = backbone.embed_scale(si + 1, nxt).repeat(2, 1, 1)
    finally:
        backbone.kv_caching(False)
    return state


def random_labels(batch: int, num_classes: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Uniform class labels drawn as the official sampler does (one multinomial over a (1, classes) row)."""
    uniform = torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32, device=device)
    return torch.multinomial(uniform, num_samples=batch, replacement=True, generator=generator).reshape(batch)
