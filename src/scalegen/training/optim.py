"""Optimiser pieces shared by the LightningModules: no-decay parameter groups and VAR's LR / weight-decay schedules."""
from __future__ import annotations

import math
from typing import Iterable

import torch.nn as nn

# names that never get weight decay, besides every bias and 1-D tensor (VAR train.py `nowd_keys`, our names)
NO_DECAY_KEYS = ("pos_embed", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul")
SCHEDULES = ("lin0", "lin", "cos", "const")


def param_groups(module: nn.Module, weight_decay: float, no_decay_keys: Iterable[str] = NO_DECAY_KEYS) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keys)
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay, wd_scale=1.0),
            dict(params=no_decay, weight_decay=0.0, wd_scale=0.0)]


def lr_factor(step: int, total: int, warmup: int, schedule: str = "lin0", wp0: float = 0.005, wpe: float = 0.01) -> float:
    """Fraction of the peak LR at `step` (VAR's `lr_wd_annealing`): linear warm-up from wp0, then the schedule down to wpe.

    lin0 holds the peak for the first 5% after warm-up, then decays linearly; lin holds 15%; cos is half-cosine.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return wp0 + (1 - wp0) * step / warmup
    if schedule == "const":
        return 1.0
    passed = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * passed))
    hold = 0.05 if schedule == "lin0" else 0.15
    return 1.0 if passed < hold else wpe + (1 - wpe) * (1 - passed) / (1 - hold)


def wd_value(step: int, total: int, wd: float, wd_end: float | None = None) -> float:
    """Cosine from wd to wd_end over the whole run (wd_end None or 0: constant, as VAR's --twde default)."""
    wd_end = wd if not wd_end else wd_end
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * min(1.0, step / max(1, total - 1))))


def apply_schedule(optimizer, step: int, total: int, peak_lr: float, warmup: int, schedule: str, wd: float,
                   wd_end: float | None, wp0: float = 0.005, wpe: float = 0.01) -> float:
    lr = peak_lr * lr_factor(step, total, warmup, schedule, wp0, wpe)
    decay = wd_value(step, total, wd, wd_end)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = decay * group.get("wd_scale", 1.0)
    return lr
