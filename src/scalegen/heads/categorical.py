"""Categorical head: AdaLN then a linear layer to the codebook, cross-entropy, top-k/top-p/Gumbel sampling.

Samplers are plain functions over tensors. They reproduce the official call sequence exactly (in-place masking,
one `torch.multinomial` per scale, then the Gumbel draw), so a seeded CPU generator gives the official tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalegen.generation.guidance import ScaleGuidance
from scalegen.generation.options import HeadOptions
from scalegen.generators.attention import AdaLNBeforeHead


@dataclass(frozen=True)
class CategoricalOptions(HeadOptions):
    """The categorical head's sampling options (config keys of the same names); None: the head's own (head.top_k, ...)."""

    top_k: int | None = None  # 0: off
    top_p: float | None = None  # 0: off
    more_smooth: bool | None = None  # Gumbel-soft codes: VAR's visualisation trick, never for FID

    def __post_init__(self):
        check_sampling(self.top_k, self.top_p, self.more_smooth)

    def check_vocabulary(self, vocab_size: int) -> None:
        check_top_k(self.top_k, vocab_size)


def check_sampling(top_k=None, top_p=None, more_smooth=None, prefix: str = "") -> None:
    """Categorical sampling options that cannot work, named by their key (`prefix`: where they were set, e.g. "head.")."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"{prefix}top_k={top_k!r}: needs an integer >= 0 (0: off)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 <= top_p <= 1.0):
        raise ValueError(f"{prefix}top_p={top_p!r}: needs a number in [0, 1] (0: off)")
    if more_smooth is not None and not isinstance(more_smooth, bool):
        raise ValueError(f"{prefix}more_smooth={more_smooth!r}: needs true or false")


def check_top_k(top_k: int | None, vocab_size: int, prefix: str = "") -> None:
    if top_k is not None and top_k > vocab_size:
        raise ValueError(f"{prefix}top_k={top_k}: above the vocabulary of {vocab_size} codes; use at most {vocab_size} "
                         "(or 0: off)")


class CategoricalHead(nn.Module):
    needs_discrete = True  # predicts code indices: pairs only with a VQ tokenizer
    options_type = CategoricalOptions
    greedy_options = MappingProxyType({"top_k": 1})  # scales sampled greedily (FlexVAR's off-grid rule)

    def __init__(self, width: int, cond_dim: int, vocab_size: int, norm_eps: float = 1e-6, label_smoothing: float = 0.0,
                 top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False, *, token_dim: int | None = None):
        """`token_dim` is part of every head's construction contract (scalegen.build); indices need no latent width.
        top_k, top_p, more_smooth: its sampling defaults (sample.top_k, ... override them), so a head swap takes them."""
        super().__init__()
        check_sampling(top_k, top_p, more_smooth, prefix="head.")
        check_top_k(top_k, vocab_size, prefix="head.")
        self.top_k, self.top_p, self.more_smooth = top_k, top_p, more_smooth
        self.vocab_size, self.label_smoothing = vocab_size, label_smoothing
        self.norm = AdaLNBeforeHead(width, cond_dim, norm_eps)
        self.proj = nn.Linear(width, vocab_size)

    def forward(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Hidden (B, L, C) -> logits (B, L, V), always float32."""
        return self.proj(self.norm(hidden.float(), cond).float()).float()

    @torch.no_grad()
    def sample(self, hidden: torch.Tensor, cond: torch.Tensor, guidance: ScaleGuidance, options: CategoricalOptions, *,
               si: int, size: tuple[int, int], generator=None, inspect=None):
        """One scale of generation. hidden/cond hold the conditional then the null-class half (2B rows).

        Returns (indices (B, n), soft codes weights (B, n, V) or None): guided logits, top-k/top-p, one multinomial
        draw, then for `more_smooth` (VAR's visualisation trick, never for FID) a Gumbel-soft mix of the masked logits.
        """
        logits = self(hidden, cond)
        B = logits.shape[0] // 2
        logits = guidance(logits[:B], logits[B:])
        if inspect:
            inspect("logits_cfg", logits)
        top_k = self.top_k if options.top_k is None else options.top_k
        top_p = self.top_p if options.top_p is None else options.top_p
        smooth = self.more_smooth if options.more_smooth is None else options.more_smooth
        idx = sample_tokens(logits, top_k, top_p, generator)  # masks `logits` in place
        ratio = guidance.ratio
        soft = gumbel_soft(logits.mul(1 + ratio), smooth_tau(ratio), generator) if smooth else None
        if inspect:
            inspect("logits_masked", logits)
            inspect("idx", idx)
        return idx, soft

    @torch.no_grad()
    def var_init(self, init_head: float, init_adaln: float) -> None:
        """The head's part of VAR's init_weights (var.py:236-286), after the trunc-normal of every linear: logits
        scaled by init_head, AdaLN at init_adaln strength, zero biases."""
        self.proj.weight.mul_(init_head)
        self.proj.bias.zero_()
        self.norm.ada_lin[-1].weight.mul_(init_adaln)
        self.norm.ada_lin[-1].bias.zero_()

    def training_loss(self, hidden: torch.Tensor, cond: torch.Tensor, targets: list[torch.Tensor], scales):
        """The contract every head keeps for the LightningModule: hidden states + per-scale targets -> loss, logs."""
        return self.loss(self(hidden, cond), torch.cat(targets, dim=1), scales.offsets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, scale_offsets: list[tuple[int, int]]):
        """Mean token cross-entropy (every token weighs 1/L, as VAR) and per-scale loss/accuracy for logging."""
        B, L, V = logits.shape
        ce = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), label_smoothing=self.label_smoothing,
                             reduction="none").view(B, L)
        loss = ce.mul(1.0 / L).sum(-1).mean()
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets).float()
            per_scale = {si: {"loss": ce[:, b:e].mean(), "acc": hit[:, b:e].mean() * 100} for si, (b, e) in enumerate(scale_offsets)}
        return loss, per_scale


def top_k_top_p_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (in place) logits below the k-th largest, then outside the nucleus of mass top_p; returns them."""
    if top_k > 0:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(drop_sorted.scatter(order.ndim - 1, order, drop_sorted), -torch.inf)
    return logits


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits (B, n, V) -> token indices (B, n). Masks `logits` in place (the Gumbel path reads the masked ones)."""
    B, n, V = logits.shape
    probs = top_k_top_p_(logits, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, n)


def gumbel_soft(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A soft one-hot: softmax((logits + Gumbel noise) / tau), the noise drawn from `generator`."""
    if generator is None:
        return F.gumbel_softmax(logits, tau=tau, hard=False, dim=-1)
    gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(-1)


def smooth_tau(ratio: float) -> float:
    """VAR's `more_smooth` temperature, annealed over scales (MaskGIT-style)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)
