"""Optimiser pieces of the generator: VAR's no-decay parameter groups and its LR / weight-decay schedule."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
import torch.nn as nn

# names that never get weight decay, besides every bias and 1-D tensor (VAR train.py `nowd_keys`, our names)
NO_DECAY_KEYS = ("pos_embed", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul")
SCHEDULES = ("lin0", "lin", "cos", "const")
# the generator's optimizer without a config: (param groups, lr=peak LR) -> AdamW
DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, betas=(0.9, 0.95), weight_decay=0.05)


@dataclass(frozen=True)
class LRSchedule:
    """VAR's LR / weight-decay schedule (`lr_wd_annealing`, utils/lr_control.py): the peak LR is base_lr x global
    batch / 256; linear warm-up from wp0 x peak, then `kind` down to wpe x peak; weight decay from the optimizer's
    `weight_decay` cosine to weight_decay_end (None or 0: constant)."""

    base_lr: float = 1e-4
    warmup: float = 0.02            # steps, or a fraction of the run when < 1
    kind: str = "lin0"              # one of SCHEDULES
    wp0: float = 0.005
    wpe: float = 0.01
    weight_decay_end: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}, got {self.kind!r}")

    def warmup_steps(self, total: int) -> int:
        return int(self.warmup if self.warmup >= 1 else round(self.warmup * total))

    def apply(self, optimizer, step: int, total: int, peak_lr: float) -> float:
        """Set every group's LR and weight decay for `step` of `total`; the peak decay is the optimizer's default."""
        lr = peak_lr * lr_factor(step, total, self.warmup_steps(total), self.kind, self.wp0, self.wpe)
        decay = wd_value(step, total, optimizer.defaults.get("weight_decay", 0.0), self.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = decay * group.get("wd_scale", 1.0)
        return lr


def param_groups(module: nn.Module, no_decay_keys: Iterable[str] = NO_DECAY_KEYS) -> list[dict]:
    """The decaying group takes the optimizer's `weight_decay`; biases, 1-D tensors and `no_decay_keys` get none."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keys)
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, wd_scale=1.0), dict(params=no_decay, weight_decay=0.0, wd_scale=0.0)]


def build_optimizer(make: Callable[..., torch.optim.Optimizer], groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """`make(groups, lr=lr)` with the fastest implementation the optimizer has, unless its config chose one: fused
    when every parameter is a CUDA floating-point tensor (one kernel, and skipped steps stay on the device through
    `found_inf`), else foreach (the same numbers as the per-tensor loop on the CPU, in fewer kernels)."""
    chosen = getattr(make, "keywords", {}) or {}
    try:
        accepts = inspect.signature(getattr(make, "func", make)).parameters
    except (TypeError, ValueError):
        accepts = {}
    params = [p for group in groups for p in group["params"]]
    extra = {}
    if "fused" not in chosen and "foreach" not in chosen:
        cuda = bool(params) and all(p.is_cuda and torch.is_floating_point(p) for p in params)
        if cuda and "fused" in accepts:
            extra["fused"] = True
        elif "foreach" in accepts:
            extra["foreach"] = True
    return make(groups, lr=lr, **extra)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer reads a `found_inf` tensor and skips its step on the device when it is 1 (the fused
    Adam/AdamW/SGD kernels, as torch.amp.GradScaler drives them)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(optimizer.defaults.get("fused"))


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
