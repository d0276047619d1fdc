"""Scaling fits of a sweep over model size: final loss and FID against parameters and against training FLOPs, a
power law per method (scalegen.eval.fits: exponent with its confidence interval), every method on one log-log figure
per quantity and axis — VAR's scaling-law figures, for every method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from scalegen.eval import figures
from scalegen.eval.fits import PowerLawFit, power_law_fit

QUANTITIES = [("loss", "final loss"), ("fid", "FID")]
AXES = [("params", "parameters"), ("train_flops", "training FLOPs")]
MIN_POINTS = 3  # two points fit any line: an exponent's interval needs a third


@dataclass
class ScalingPoint:
    method: str
    label: str
    values: dict  # params, train_flops, loss, fid (any may be missing)


@dataclass
class ScalingFit:
    method: str
    quantity: str
    axis: str
    points: int
    fit: PowerLawFit


def _usable(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def fit_all(points: list[ScalingPoint], confidence: float = 0.95) -> list[ScalingFit]:
    """A fit per (method, quantity, axis) with at least MIN_POINTS runs of distinct sizes."""
    fits = []
    methods = sorted({p.method for p in points})
    for quantity, _ in QUANTITIES:
        for axis, _ in AXES:
            for method in methods:
                xy = [(p.values[axis], p.values[quantity]) for p in points if p.method == method
                      and _usable(p.values.get(axis)) and _usable(p.values.get(quantity))]
                if len({x for x, _ in xy}) < MIN_POINTS:
                    continue
                fit = power_law_fit([x for x, _ in xy], [y for _, y in xy], confidence=confidence)
                fits.append(ScalingFit(method, quantity, axis, len(xy), fit))
    return fits


def fit_table(fits: list[ScalingFit], confidence: float = 0.95) -> tuple[list[str], list[list[str]]]:
    head = ["method", "quantity", "against", "runs", "exponent", f"{confidence:.0%} interval", "coefficient", "R²"]
    names, axes = dict(QUANTITIES), dict(AXES)
    body = [[f.method, names[f.quantity], axes[f.axis], str(f.points), f"{f.fit.exponent:.3f}",
             "—" if math.isnan(f.fit.exponent_low) else f"[{f.fit.exponent_low:.3f}, {f.fit.exponent_high:.3f}]",
             f"{f.fit.coef:.3g}", f"{f.fit.r2:.3f}"] for f in fits]
    return head, body


def plot_scaling(points: list[ScalingPoint], fits: list[ScalingFit], out: Path) -> list[tuple[str, Path]]:
    """One log-log figure per (quantity, axis) that has a fit: every method's runs and its fitted line."""
    import numpy as np
    out.mkdir(parents=True, exist_ok=True)
    made = []
    methods = sorted({p.method for p in points})
    for quantity, qname in QUANTITIES:
        for axis, aname in AXES:
            these = [f for f in fits if f.quantity == quantity and f.axis == axis]
            if not these:
                continue
            fig, ax = figures.axes()
            for f in these:
                colour = f"C{methods.index(f.method)}"
                xy = [(p.values[axis], p.values[quantity]) for p in points if p.method == f.method
                      and _usable(p.values.get(axis)) and _usable(p.values.get(quantity))]
                x = np.array([a for a, _ in xy])
                ax.scatter(x, [b for _, b in xy], color=colour, s=18)
                grid = np.geomspace(x.min(), x.max(), 50)
                ax.plot(grid, f.fit.coef * grid ** f.fit.exponent, color=colour,
                        label=f"{f.method}: ∝ x^{f.fit.exponent:.3f}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(aname)
            ax.set_ylabel(qname)
            ax.set_title(f"{qname} vs {aname}")
            path = figures.save(fig, ax, out / f"scaling_{quantity}_vs_{axis}.png")
            made.append((f"{qname} vs {aname}", path))
    return made
