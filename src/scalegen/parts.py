"""The interfaces of the parts a generator is made of, declared once: what the sampling loop, the LightningModule and
build.py and checks.py read from a tokenizer, a composition, a backbone and a head.

Every part class declares these attributes (the kind questions as class attributes), so nothing needs to probe a
part with getattr/hasattr. A scale-free part computes from whatever schedule a call brings; a tied one refuses
another (scalegen.schedule.anyscale).
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol

import torch
import torch.nn as nn

from scalegen.generation.guidance import ScaleGuidance
from scalegen.generation.options import HeadOptions
from scalegen.schedule.scales import ScaleSchedule


class Tokenizer(Protocol):
    discrete: ClassVar[bool]  # code indices (VQ) or continuous latents
    residual: ClassVar[bool]  # VAR's multi-scale residual quantizer: its tokens are tied to its schedule
    stochastic: ClassVar[bool]  # encodes to a posterior (KL VAE): `posterior(images)`, `latent_from_moments(m)`
    statistics: ClassVar[tuple[str, ...]]  # state keys of statistics only: another shape there resets them on load
    downsample: int  # image pixels per latent position
    latent_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def codebook_usage(self, stats: Any, sizes: list[tuple[int, int]]) -> dict[str, float]: ...  # training logs

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...


class Composition(Protocol):
    """Per-scale targets and teacher inputs from a latent, and the step from one scale's targets to the next input;
    it owns the run's schedule."""

    discrete: ClassVar[bool]  # its targets are code indices
    scale_free: ClassVar[bool]
    scales: ScaleSchedule
    token_dim: int
    vocab_size: int | None

    @staticmethod
    def incompatible(tokenizer_cls: type) -> str | None: ...  # why a tokenizer class cannot serve it (config time)

    def at(self, scales, key: str = "scales") -> "Composition": ...  # the composition for `scales` (None: this)

    def targets(self, latent: torch.Tensor) -> list[torch.Tensor]: ...

    def teacher_inputs(self, targets: list[torch.Tensor]) -> torch.Tensor: ...

    def begin(self, batch: int, device) -> Any: ...

    def advance(self, si: int, state: Any, targets: torch.Tensor, soft: torch.Tensor | None = None) -> tuple: ...

    def decode(self, state: Any) -> torch.Tensor: ...


class Backbone(Protocol):
    """The sequence model over scales; every call takes the run's schedule (None: the one it was built with)."""

    scale_free: ClassVar[bool]
    scales: ScaleSchedule  # the schedule it was built with
    num_classes: int  # class index num_classes is the null class of guidance
    token_dim: int
    width: int
    blocks: nn.ModuleList  # activation checkpointing and FSDP wrap these

    def resolve_scales(self, scales=None, key: str = "scales") -> ScaleSchedule: ...

    def __call__(self, labels: torch.Tensor, inputs: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def start(self, labels: torch.Tensor, scales=None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, x: torch.Tensor, cond: torch.Tensor, si: int, scales=None) -> torch.Tensor: ...

    def embed_scale(self, si: int, tokens: torch.Tensor, scales=None) -> torch.Tensor: ...

    def kv_caching(self, enable: bool) -> None: ...


class Head(Protocol):
    """Hidden states -> the training loss, and one scale's targets at generation."""

    needs_discrete: ClassVar[bool]  # predicts code indices (True) or regresses continuous latents (False)
    options_type: ClassVar[type[HeadOptions]]  # its own sampling options (config keys = the dataclass fields)
    greedy_options: ClassVar[Mapping[str, Any]]  # set on scales sampled greedily (FlexVAR's off-grid rule)

    def training_loss(self, hidden: torch.Tensor, cond: torch.Tensor, targets: list[torch.Tensor],
                      scales: ScaleSchedule) -> tuple[torch.Tensor, dict]: ...

    def sample(self, hidden: torch.Tensor, cond: torch.Tensor, guidance: ScaleGuidance, options: HeadOptions, *,
               si: int, size: tuple[int, int], generator: torch.Generator | None = None,
               inspect=None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def var_init(self, init_head: float, init_adaln: float) -> None: ...  # its part of VAR's init_weights
