"""The speed–quality frontier: each method's sampling settings (sample.py's sample_stats.json, one per sweep job) as
points of quality (FID) against speed (images/s) and against cost (sampling FLOPs/image), with its Pareto front.

A point is on the front when no other point of its method is at least as good on both axes and better on one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from scalegen.eval import figures

STATS_FILE = "sample_stats.json"
# (axis key, label, larger is better)
SPEED_AXES = [("images_per_s", "images/s", True), ("sample_flops_per_image", "sampling FLOPs / image", False)]


@dataclass
class SamplePoint:
    path: Path
    method: str
    options: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)   # images_per_s, sample_flops_per_image, fid, fid_low, kid, class_acc…

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.options.items())) or "defaults"


def pareto_mask(costs: Sequence[Sequence[float]]) -> np.ndarray:
    """(N,) bool: the points no other point dominates, every column a cost (smaller is better; negate a gain). Equal
    points are all on the front."""
    c = np.asarray(costs, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0, dtype=bool)
    le = (c[:, None, :] <= c[None, :, :]).all(-1)   # [j, i]: j is at least as good as i everywhere
    lt = (c[:, None, :] < c[None, :, :]).any(-1)    # ... and better somewhere
    return ~(le & lt).any(0)


def front(points: list[SamplePoint], quality: str, axis: str, larger_is_better: bool) -> np.ndarray:
    """The Pareto mask of `points` (one method's) on (quality, lower is better) x (axis)."""
    costs = [[p.values[quality], -p.values[axis] if larger_is_better else p.values[axis]] for p in points]
    return pareto_mask(costs)


def read_points(roots: Sequence[Path]) -> list[SamplePoint]:
    """Every sample_stats.json under `roots` (a sample.py -m sweep folder, or one job's folder)."""
    points = []
    for root in roots:
        for path in sorted(Path(root).rglob(STATS_FILE)):
            rec = json.loads(path.read_text())
            values = {k: rec.get(k) for k in ("images_per_s", "sample_flops_per_image")}
            values.update(rec.get("metrics") or {})
            points.append(SamplePoint(path.parent, str(rec.get("method") or "?"), rec.get("options") or {},
                                      {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}))
    return points


def by_method(points: list[SamplePoint]) -> dict[str, list[SamplePoint]]:
    out: dict[str, list[SamplePoint]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    return out


def plot_fronts(points: list[SamplePoint], out: Path, quality: str = "fid") -> list[tuple[str, Path]]:
    """One figure per speed axis: every method's points (hollow), its front (filled, joined)."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for axis, label, larger in SPEED_AXES:
        groups = {m: [p for p in ps if quality in p.values and axis in p.values] for m, ps in by_method(points).items()}
        groups = {m: ps for m, ps in groups.items() if ps}
        if not groups:
            continue
        fig, ax = figures.axes()
        for i, (method, ps) in enumerate(groups.items()):
            colour = f"C{i}"
            mask = front(ps, quality, axis, larger)
            x = np.array([p.values[axis] for p in ps])
            y = np.array([p.values[quality] for p in ps])
            ax.scatter(x[~mask], y[~mask], facecolors="none", edgecolors=colour, s=22)
            order = np.argsort(x[mask])
            ax.plot(x[mask][order], y[mask][order], "o-", color=colour, ms=5, label=f"{method} (front)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(quality.upper() if quality in ("fid", "kid") else quality)
        ax.set_title(f"{quality.upper()} vs {label}: Pareto fronts")
        made.append((f"{quality.upper()} vs {label}", figures.save(fig, ax, out / f"frontier_{axis}.png")))
    return made
