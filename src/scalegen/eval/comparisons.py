"""Which differences between runs are larger than their uncertainty (scalegen.eval.bootstrap says how each interval
is made): runs that differ only in their seeds form one group (mean and t interval over seeds), and each pair of
groups gets the interval of its difference for every metric — Welch's over seeds where both have several, the
bootstrap replicates' where they have one, and a normal approximation from the logged intervals without replicates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

from scalegen.eval.bootstrap import CONFIDENCE, difference_from_replicates, seed_interval, significant, welch_interval
from scalegen.eval.runs import IGNORED, Run

METRICS = [("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"),
           ("recall", "recall", "{:.3f}"), ("class_acc", "class acc", "{:.3f}")]


@dataclass
class Group:
    label: str
    runs: list

    def values(self, metric: str) -> list[float]:
        return [v for v in (r.last(f"eval/{metric}") for r in self.runs) if v is not None]


def group_by_seed(runs: list[Run]) -> list[Group]:
    """Runs whose configs differ only in keys ending in `seed` (and run-folder paths) form one group, in run order."""
    def key(r: Run):
        return tuple(sorted((k, str(v)) for k, v in r.config.items()
                            if not k.split(".")[-1].endswith("seed") and not any(k.startswith(p) for p in IGNORED)))

    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    out = []
    for members in groups.values():
        words = [w for w in members[0].label.split() if not w.split("=")[0].endswith("seed")]
        label = " ".join(words) if len(members) > 1 else members[0].label
        out.append(Group(label or members[0].method, members))
    return out


def seed_table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Mean [t interval] over seeds of every group with several."""
    head = ["runs", "seeds"] + [name for _, name, _ in METRICS]
    body = []
    for g in groups:
        if len(g.runs) < 2:
            continue
        row = [g.label, str(len(g.runs))]
        for metric, _, f in METRICS:
            v = g.values(metric)
            if len(v) < 2:
                row.append("—")
                continue
            mean, low, high = seed_interval(v)
            row.append(f"{f.format(mean)} [{f.format(low)}, {f.format(high)}]")
        body.append(row)
    return head, body


@dataclass
class Difference:
    value: float
    low: float
    high: float
    how: str

    @property
    def significant(self) -> bool | None:
        return significant(self.low, self.high)


def difference(a: Group, b: Group, metric: str) -> Difference | None:
    va, vb = a.values(metric), b.values(metric)
    if not va or not vb:
        return None
    value = sum(va) / len(va) - sum(vb) / len(vb)
    if len(va) >= 2 and len(vb) >= 2:
        return Difference(value, *welch_interval(va, vb), "seeds")
    ra, rb = a.runs[0].replicates.get(metric), b.runs[0].replicates.get(metric)
    if ra and rb:
        low, high = difference_from_replicates(ra, rb, value)
        return Difference(value, low, high, "bootstrap")
    bounds = [(r.last(f"eval/{metric}_low"), r.last(f"eval/{metric}_high")) for r in (a.runs[0], b.runs[0])]
    if all(lo is not None and hi is not None for lo, hi in bounds):
        z = 1.959963984540054  # the logged 95% intervals as normal ones: se = width / (2 z), se of A - B by quadrature
        se = math.sqrt(sum(((hi - lo) / (2 * z)) ** 2 for lo, hi in bounds))
        return Difference(value, value - z * se, value + z * se, "normal approx.")
    return None


def comparison_table(groups: list[Group]) -> tuple[list[str], list[list[str]], list[str]]:
    """One row per pair of groups: A − B of every metric with its interval, `*` where it excludes 0; and the notes
    saying which pairs differ beyond their uncertainty."""
    head = ["A", "B"] + [f"{name} A−B" for _, name, _ in METRICS]
    body, notes = [], []
    for a, b in combinations(groups, 2):
        row, beyond = [a.label, b.label], []
        for metric, name, f in METRICS:
            d = difference(a, b, metric)
            if d is None:
                row.append("—")
                continue
            mark = " *" if d.significant else ""
            row.append(f"{f.format(d.value)} [{f.format(d.low)}, {f.format(d.high)}]{mark} ({d.how})")
            if d.significant:
                beyond.append(name)
        body.append(row)
        notes.append(f"{a.label} vs {b.label}: " + (f"differ beyond the {CONFIDENCE:.0%} uncertainty in "
                                                     f"{', '.join(beyond)}" if beyond else
                                                     "no difference beyond the uncertainty"))
    return head, body, notes
