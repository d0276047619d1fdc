"""Scaling fits (scalegen.eval.fits): the exponent of exact power laws, the interval's coverage on noisy ones, and
the t quantile against tabulated values."""
from __future__ import annotations

import math

import pytest
import torch

from scalegen.eval.fits import power_law_fit, t_quantile


@pytest.mark.parametrize("q, dof, expected", [(0.975, 1, 12.706204736), (0.975, 10, 2.228138852),
                                              (0.95, 5, 2.015048373), (0.995, 3, 5.840909310)])
def test_t_quantile_matches_the_tables(q, dof, expected):
    assert t_quantile(q, dof) == pytest.approx(expected, rel=1e-8)


def test_exact_power_law_gives_its_exponent():
    x = [1e5, 3e5, 1e6, 3e6, 1e7]
    fit = power_law_fit(x, [2.5 * v ** -0.073 for v in x])
    assert fit.exponent == pytest.approx(-0.073, abs=1e-12) and fit.coef == pytest.approx(2.5, rel=1e-9)
    assert fit.exponent_low == pytest.approx(-0.073, abs=1e-9) and fit.exponent_high == pytest.approx(-0.073, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit(1e8) == pytest.approx(2.5 * 1e8 ** -0.073)


def test_noisy_power_law_interval_covers_the_true_exponent_as_often_as_it_says():
    gen = torch.Generator().manual_seed(0)
    x = [10 ** (4 + 0.5 * i) for i in range(6)]
    trials, covered, widths = 400, 0, []
    for _ in range(trials):
        noise = torch.randn(len(x), generator=gen, dtype=torch.float64) * 0.05  # log-normal noise, 5 %
        fit = power_law_fit(x, [3.0 * v ** -0.2 * math.exp(e) for v, e in zip(x, noise.tolist())], confidence=0.9)
        covered += fit.exponent_low <= -0.2 <= fit.exponent_high
        widths.append(fit.exponent_high - fit.exponent_low)
    # binomial(400, 0.9): sd 6 draws; a wrong quantile (normal instead of t, or a missing n - 2) misses this band
    assert 0.85 * trials <= covered <= 0.95 * trials
    assert all(w > 0 for w in widths)


def test_two_points_fit_without_an_interval_and_bad_input_is_refused():
    fit = power_law_fit([1.0, 10.0], [1.0, 0.1])
    assert fit.exponent == pytest.approx(-1.0) and math.isnan(fit.exponent_low) and math.isnan(fit.exponent_high)
    with pytest.raises(ValueError, match="> 0"):
        power_law_fit([1.0, 2.0, 3.0], [1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="same"):
        power_law_fit([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="two points"):
        power_law_fit([2.0], [1.0])
