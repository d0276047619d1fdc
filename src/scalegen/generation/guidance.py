"""Classifier-free guidance, once for every method: how strong at each scale, and how to mix the two passes."""
from __future__ import annotations

import torch

SCHEDULES = ("linear", "constant", "flowar")


def guidance_strength(cfg: float, ratio: float, schedule: str = "linear") -> float:
    """Guidance t at a scale whose position in the schedule is `ratio` in [0, 1].

    `linear` is VAR's ramp (t = cfg * si / (S-1): none at the first scale, full at the last; VAR issues #14, #76).
    `flowar` ramps the CFG scale 1 + t from 1 to cfg (flowar.py:411, cfg_k = 1 + (cfg - 1) * si / (S-1)).
    """
    if schedule == "linear":
        return cfg * ratio
    if schedule == "constant":
        return cfg
    if schedule == "flowar":
        return (cfg - 1) * ratio
    raise ValueError(f"cfg_schedule must be one of {SCHEDULES}, got {schedule!r}")


MIXES = ("var", "llamagen")


def guide(cond: torch.Tensor, uncond: torch.Tensor, t: float, mix: str = "var") -> torch.Tensor:
    """(1 + t) * cond - t * uncond: t = 0 is the conditional prediction alone.

    `llamagen` is uncond + (cond - uncond) * t, t being the CFG scale itself (FlexVAR's `used_llamagen_cfg`,
    flexvar.py:224-228, with cfg_schedule=constant): the same line, in the official operand order.
    """
    if mix == "var":
        return (1 + t) * cond - t * uncond
    if mix == "llamagen":
        return uncond + (cond - uncond) * t
    raise ValueError(f"cfg_mix must be one of {MIXES}, got {mix!r}")
