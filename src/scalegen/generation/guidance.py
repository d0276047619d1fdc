"""Classifier-free guidance, once for every method: the policy (how strong at each scale, by which mixing rule) and
the mixing of the conditional and null-class predictions, which both heads apply with what `GuidancePolicy.at` gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "constant", "flowar")
MIXES = ("var", "llamagen")


def guide(cond: torch.Tensor, uncond: torch.Tensor, t: float, mix: str = "var") -> torch.Tensor:
    """(1 + t) * cond - t * uncond: t = 0 is the conditional prediction alone.

    `llamagen` is uncond + (cond - uncond) * t, t being the CFG scale itself (FlexVAR's `used_llamagen_cfg`,
    flexvar.py:224-228, with cfg_schedule=constant; FlowAR's velocities, sampler.py): the same line, in the official
    operand order.
    """
    if mix == "var":
        return (1 + t) * cond - t * uncond
    if mix == "llamagen":
        return uncond + (cond - uncond) * t
    raise ValueError(f"cfg_mix must be one of {MIXES}, got {mix!r}")


@dataclass(frozen=True)
class ScaleGuidance:
    """Guidance at one scale: the mixing rule and its weight, and where the scale sits in the ramp."""

    weight: float  # var: t of (1 + t) c - t u; llamagen: the CFG scale w of u + (c - u) w
    mix: str = "var"
    ratio: float = 1.0  # si / min(S - 1, ratio_steps): VAR's more_smooth anneals with it
    beyond: bool = False  # past max_side: FlexVAR samples this scale greedily

    @property
    def active(self) -> bool:
        """Whether mixing changes the conditional prediction; FlowAR's sampler guides only then (cfg_scale > 1)."""
        return self.weight > (1.0 if self.mix == "llamagen" else 0.0)

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return guide(cond, uncond, self.weight, self.mix)


@dataclass(frozen=True)
class GuidancePolicy:
    """How classifier-free guidance is applied over a run's scales (the fields are the sampling config keys).

    cfg_schedule `linear` is VAR's ramp t = cfg_scale * si / (S-1): none at the first scale, full at the last (VAR
    issues #14, #76); `constant` is cfg_scale everywhere; `flowar` ramps the CFG scale itself from 1 to cfg_scale
    (flowar.py:411). cfg_mix: the mixing rule (`guide`); None is the schedule's own (flowar: llamagen, else var).
    FlexVAR's rules, off by default (None or 0): the ramp reaches full strength at step `ratio_steps`
    (si / min(S-1, ratio_steps), so longer lists go past it, flexvar.py:206), and scales with a side above `max_side`
    get the full strength and greedy sampling (flexvar.py:221,230).
    """

    cfg_scale: float = 1.5
    cfg_schedule: str = "linear"
    cfg_mix: str | None = None
    ratio_steps: int | None = None
    max_side: int | None = None

    def __post_init__(self):
        if self.cfg_schedule not in SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {SCHEDULES}, got {self.cfg_schedule!r}")
        if self.cfg_mix is not None and self.cfg_mix not in MIXES:
            raise ValueError(f"cfg_mix must be one of {MIXES} or null, got {self.cfg_mix!r}")

    @property
    def mix(self) -> str:
        return self.cfg_mix or ("llamagen" if self.cfg_schedule == "flowar" else "var")

    def at(self, si: int, S: int, size: tuple[int, int]) -> ScaleGuidance:
        """What a head needs at scale `si` of `S`, of size (h, w); each weight is the official expression."""
        steps = min(S - 1, self.ratio_steps or S - 1)
        ratio = si / steps if S > 1 else 1.0
        beyond = bool(self.max_side) and max(size) > self.max_side  # past the largest trained scale (max_pn)
        scale, mix = self.cfg_scale, self.mix
        if self.cfg_schedule == "flowar":  # the CFG scale (cfg - 1) * si / (S - 1) + 1, flowar.py:411
            ramp = (scale - 1) * si / steps if S > 1 and not beyond else scale - 1
            weight = ramp + 1 if mix == "llamagen" else ramp
        elif beyond or self.cfg_schedule == "constant":
            weight = scale
        else:  # t = cfg * ratio: VAR's models/var.py and FlexVAR's flexvar.py:221
            weight = scale * ratio
        return ScaleGuidance(weight, mix, ratio, beyond)
