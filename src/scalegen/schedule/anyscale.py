"""Running a model on another scale list than the one it was built with: any number of steps, any final size
(FlexVAR's sampling), and a random schedule per training step (FlexVAR's trainer).

The contract: every part declares `scale_free`. The composition owns the run's schedule; running on another one
is a composition for it (`composition.at(scales)`), and the backbone and head receive the schedule with every call.
A scale-free part computes from whatever schedule it is given; a tied one (VAR's residual tokens, VAR's
per-token positions, FlowAR's tables) refuses another list before any compute, saying why (ConfigError).
"""
from __future__ import annotations

import random
from typing import Sequence

from scalegen.errors import ConfigError
from scalegen.schedule.scales import VAR_256, ScaleSchedule

# why a part cannot change its schedule, for the error message (by class name; others get the generic reason)
_WHY_FIXED = {
    "ResidualComposition": "residual (VAR) tokens are defined by the quantizer's schedule: each scale codes what the "
                           "coarser ones left, so the list cannot change after training (use a non-residual tokenizer, "
                           "e.g. model=flexvar)",
    "AdaLNTransformer": "it learns one position and a level embedding per token of its training schedule (use "
                        "backbone=flexvar, whose 2-D position table is resized to any scale)",
}


def supports_scales(part_or_cls) -> bool:
    return part_or_cls.scale_free


def why_fixed(part_or_cls) -> str:
    cls = part_or_cls if isinstance(part_or_cls, type) else type(part_or_cls)
    for klass in cls.__mro__:
        if klass.__name__ in _WHY_FIXED:
            return f"{cls.__name__}: {_WHY_FIXED[klass.__name__]}"
    return f"{cls.__name__} runs only on the schedule it was built with (scale_free = False)"


def fixed_parts(*parts_or_classes) -> list[str]:
    """The reasons of every part (instance or class) that cannot run on another schedule."""
    reasons = [why_fixed(p) for p in parts_or_classes if not supports_scales(p)]
    return list(dict.fromkeys(reasons))  # the EMA copy of a backbone says the same


def _refuse(sched: ScaleSchedule, reasons: list[str], key: str) -> ConfigError:
    shown = [h if h == w else [h, w] for h, w in sched.sizes]
    return ConfigError(f"{key}={shown}: this model runs only on the scales it was built with; " + "; ".join(reasons))


def check_scales(scales, *parts, key: str = "scales") -> ScaleSchedule | None:
    """The schedule to switch to (None: keep each part's own), after checking that every part allows it."""
    if scales is None:
        return None
    sched = ScaleSchedule.of(scales)
    if all(p.scales == sched for p in parts):
        return None
    fixed = fixed_parts(*parts)
    if fixed:
        raise _refuse(sched, fixed, key)
    return sched


def own_or(part, scales, key: str = "scales") -> ScaleSchedule:
    """The schedule one call of `part` runs on: its own (None), or `scales`, which a tied part refuses."""
    if scales is None or scales is part.scales:
        return part.scales
    sched = ScaleSchedule.of(scales)
    if sched != part.scales and not part.scale_free:
        raise _refuse(sched, [why_fixed(part)], key)
    return sched


def for_schedule(scales, composition, backbone, key: str = "scales"):
    """(composition, schedule) of a run on `scales` (None: the composition's own), once every part agreed: the
    composition for that schedule, and the schedule the backbone is then called with."""
    check_scales(scales, backbone, composition, key=key)  # every reason at once, named by `key`
    composition = composition.at(scales, key)
    return composition, backbone.resolve_scales(composition.scales, key)


class RandomScales:
    """A fresh schedule per training step: FlexVAR's `gen_curr_patch_nums` (trainer.py:89-118), its numbers as data.

    With probability `default_prob` the `default` list; otherwise `head` + k distinct sides from each [lo, hi) pool
    (sorted) + `final`. Then one draw x drops a random scale (never the head's nor the last) for every threshold in
    `drop_above` that x exceeds, and while the tokens exceed `budget` a random scale among the last `drop_from_last`
    goes (the final one included). The defaults are the official 256 px numbers; with the same `random` state the
    draws are the official ones. Lists shorter than the head plus one are left alone.
    """

    def __init__(self, default: Sequence[int] = VAR_256, head: Sequence[int] = (1, 2),
                 pools: Sequence[Sequence[int]] = ((3, 11, 5), (11, 16, 2)), final: int | None = None,
                 default_prob: float = 0.05, drop_above: Sequence[float] = (0.9, 0.95, 0.98, 0.99),
                 budget: int | None = None, drop_from_last: int = 4, seed: int | None = None):
        self.default, self.head = [int(s) for s in default], [int(s) for s in head]
        self.pools = [tuple(int(v) for v in p) for p in pools]
        for lo, hi, k in self.pools:
            if k > hi - lo:
                raise ValueError(f"pools: cannot draw {k} distinct sides from range({lo}, {hi})")
        self.final = int(final or self.default[-1])
        self.default_prob, self.drop_above, self.drop_from_last = default_prob, tuple(drop_above), drop_from_last
        self.budget = budget or sum(s * s for s in self.default)
        self.rng = random.Random(seed) if seed is not None else random  # the global one by default, as the official

    def __call__(self) -> list[int]:
        r = self.rng
        if r.random() < self.default_prob:
            sides = list(self.default)
        else:
            picks = [s for lo, hi, k in self.pools for s in r.sample(range(lo, hi), k)]
            sides = self.head + sorted(picks) + [self.final]
        x = r.random()
        for threshold in self.drop_above:
            if x > threshold and len(sides) - 1 > len(self.head):
                sides.pop(r.choice(range(len(self.head), len(sides) - 1)))
        while sum(s * s for s in sides) > self.budget and len(sides) > 1:
            sides.pop(r.choice(range(max(len(sides) - self.drop_from_last, 1), len(sides))))
        return sides
