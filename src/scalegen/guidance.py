"""Classifier-free guidance, once for every method: how strong at each scale, and how to mix the two passes."""
from __future__ import annotations

import torch

SCHEDULES = ("linear", "constant")


def guidance_strength(cfg: float, ratio: float, schedule: str = "linear") -> float:
    """Guidance t at a scale whose position in the schedule is `ratio` in [0, 1].

    `linear` is VAR's ramp (t = cfg * si / (S-1): none at the first scale, full at the last; VAR issues #14, #76).
    """
    if schedule == "linear":
        return cfg * ratio
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule must be one of {SCHEDULES}, got {schedule!r}")


def guide(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """(1 + t) * cond - t * uncond: t = 0 is the conditional prediction alone."""
    return (1 + t) * cond - t * uncond
