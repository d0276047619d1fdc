"""Scaling fits: y = coef * x ** exponent by least squares on log-log axes (the form of VAR's scaling-law figures),
with a confidence interval for the exponent from the t-distribution of the slope's standard error."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence


class PowerLawFit(NamedTuple):
    coef: float
    exponent: float
    exponent_low: float   # the interval's ends (NaN with two points: a line through two points has no error)
    exponent_high: float
    r2: float             # of the log-log line

    def __call__(self, x: float) -> float:
        """The fitted y at x."""
        return self.coef * x ** self.exponent


def t_quantile(q: float, dof: int) -> float:
    """The q-quantile of Student's t-distribution with `dof` degrees of freedom."""
    from scipy.stats import t  # scikit-learn's own dependency; heavy to import, so only when fitting

    return float(t.ppf(q, dof))


def power_law_fit(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> PowerLawFit:
    """Fit y = coef * x ** exponent to positive points by ordinary least squares of log y on log x."""
    if len(x) != len(y):
        raise ValueError(f"power_law_fit: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        raise ValueError(f"power_law_fit: needs at least two points, got {len(x)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"power_law_fit: confidence {confidence!r} must be in (0, 1)")
    bad = [(a, b) for a, b in zip(x, y) if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0)]
    if bad:
        raise ValueError(f"power_law_fit: every x and y must be finite and > 0 (log-log fit); got {bad[:3]}")
    lx, ly = [math.log(a) for a in x], [math.log(b) for b in y]
    n = len(lx)
    mx, my = sum(lx) / n, sum(ly) / n
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0.0:
        raise ValueError("power_law_fit: every x is the same: the exponent is undefined")
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    intercept = my - slope * mx
    ssr = sum((b - intercept - slope * a) ** 2 for a, b in zip(lx, ly))
    sst = sum((b - my) ** 2 for b in ly)
    r2 = 1.0 - ssr / sst if sst > 0 else 1.0
    if n == 2:
        low = high = math.nan
    else:
        half = t_quantile(0.5 + confidence / 2, n - 2) * math.sqrt(ssr / (n - 2) / sxx)
        low, high = slope - half, slope + half
    return PowerLawFit(math.exp(intercept), slope, low, high, r2)
