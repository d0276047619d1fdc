"""Error bars on synthetic features whose answers are known: the bootstrap's statistics equal torch-fidelity's on the
full set, identical distributions give a difference interval around 0, shifted ones a significant difference, and the
t intervals match their closed forms (seconds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scalegen.eval.bootstrap import (
    FidReplicates,
    difference_from_replicates,
    intervals,
    percentile_interval,
    prc_hits,
    replicates,
    seed_interval,
    significant,
    welch_interval,
)
from scalegen.eval.metrics import Evaluator, reference_from_images

D = 6


def gaussian(n: int, shift: float, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(shift, 1.0, size=(n, D)))


def stats_of(x: torch.Tensor) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics
    s = fid_features_to_statistics(x)
    return {"mu": np.asarray(s["mu"], np.float64), "sigma": np.asarray(s["sigma"], np.float64)}


def test_replicate_statistics_equal_torch_fidelity_on_the_full_set():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    gen, ref = gaussian(300, 0.3, 0).float(), gaussian(400, 0.0, 1).float()
    fid = fid_statistics_to_metric(stats_of(gen), stats_of(ref), False)["frechet_inception_distance"]
    assert FidReplicates(**stats_of(ref))(gen) == pytest.approx(fid, rel=1e-6)
    in_ref, covers = prc_hits(gen, ref, 3)
    tf = prc_features_to_metric(gen, ref, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    assert in_ref.double().mean().item() == pytest.approx(tf["precision"])
    assert covers.any(1).double().mean().item() == pytest.approx(tf["recall"])
    assert 0 < tf["precision"] < 1 and 0 < tf["recall"] < 1


def full_set(gen: torch.Tensor, ref: torch.Tensor) -> dict:
    """The metrics of the whole generated set (what the replicates are re-centred on)."""
    in_ref, covers = prc_hits(gen.float(), ref.float(), 3)
    return {"fid": FidReplicates(**stats_of(ref))(gen), "precision": in_ref.double().mean().item(),
            "recall": covers.any(1).double().mean().item()}


def test_identical_distributions_differ_by_nothing_and_shifted_ones_significantly():
    ref = gaussian(1000, 0.0, 0)
    layers = {"fid": "f", "prc": "f"}
    kw = dict(count=100, ref_stats=stats_of(ref), ref_feats={"f": ref.float()})
    ga, gb, gc = gaussian(500, 0.0, 1), gaussian(500, 0.0, 2), gaussian(500, 0.5, 3)  # c: FID ~ D * 0.25 = 1.5 more
    a, b, c = (replicates({"f": g}, layers, seed=i + 1, **kw) for i, g in enumerate((ga, gb, gc)))
    fa, fb, fc = (full_set(g, ref) for g in (ga, gb, gc))
    assert set(a) == {"fid", "precision", "recall"} and len(a["fid"]) == 100
    for metric in a:  # at 99%: three 95% checks of one seeded draw would fail by chance one time in seven
        low, high = difference_from_replicates(a[metric], b[metric], fa[metric] - fb[metric], confidence=0.99)
        assert low < 0 < high and significant(low, high) is False, metric
    low, high = difference_from_replicates(c["fid"], a["fid"], fc["fid"] - fa["fid"])
    assert significant(low, high) and 1.0 < low < high < 2.2
    low, high = difference_from_replicates(c["precision"], a["precision"], fc["precision"] - fa["precision"])
    assert significant(low, high) and high < 0  # half a standard deviation off: fewer images inside the real balls


def test_intervals_are_centred_on_the_full_set_despite_the_resampling_bias():
    """Few images: resamples repeat many of them, so raw replicates sit far from the full set's FID and recall; the
    reported interval still brackets the full-set value, with the replicates' own width."""
    ref, gen = gaussian(400, 0.0, 0), gaussian(40, 0.2, 1)
    reps = replicates({"f": gen}, {"fid": "f", "prc": "f"}, count=200, ref_stats=stats_of(ref),
                      ref_feats={"f": ref.float()})
    full = full_set(gen, ref)
    raw_low, raw_high = percentile_interval(reps["fid"])
    assert raw_low > full["fid"]  # the bias this corrects: every raw replicate above the estimate
    out = intervals(reps, full)
    for metric in ("fid", "precision", "recall"):
        assert out[f"{metric}_low"] < full[metric] < out[f"{metric}_high"], metric
    assert out["fid_high"] - out["fid_low"] == pytest.approx(raw_high - raw_low, rel=1e-9)


def test_class_accuracy_interval_is_the_binomial_one():
    n, p = 2000, 0.7
    logits = torch.zeros(n, 2)
    hits = torch.from_numpy(np.random.default_rng(0).random(n) < p)
    labels = torch.zeros(n, dtype=torch.long)
    logits[~hits, 1] = 1.0  # wrong class where not a hit
    reps = replicates({"logits": logits}, {"class_acc": "logits"}, count=400, labels=labels)
    low, high = percentile_interval(reps["class_acc"])
    acc = hits.double().mean().item()
    half = 1.96 * math.sqrt(acc * (1 - acc) / n)
    assert low < acc < high
    assert (high - low) == pytest.approx(2 * half, rel=0.15)
    # seeded: the same replicates again
    again = replicates({"logits": logits}, {"class_acc": "logits"}, count=400, labels=labels)
    assert np.array_equal(again["class_acc"], reps["class_acc"])


def test_seed_and_welch_intervals_against_closed_forms():
    mean, low, high = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * s / sqrt(n)
    assert math.isnan(seed_interval([1.0])[1])
    low, high = welch_interval([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert low == pytest.approx(-high) and significant(low, high) is False
    low, high = welch_interval([10.0, 10.5, 11.0], [1.0, 1.5, 2.0])
    assert significant(low, high) and low < 9.0 < high


def test_evaluator_writes_intervals_around_its_point_estimates(tmp_path, pixels):
    """Evaluator(bootstrap=B).score adds {metric}_low/_high that bracket its own values and keeps the replicates."""
    g = np.random.default_rng(0)
    real = torch.from_numpy(g.integers(80, 160, size=(200, 3, 4, 4), dtype=np.uint8))
    fake = torch.from_numpy(g.integers(90, 170, size=(200, 3, 4, 4), dtype=np.uint8))
    ev = Evaluator(reference_from_images(real, "real"), ["fid", "kid", "prc"], pixels, cache_dir=tmp_path,
                   kid_subset_size=50, kid_subsets=5, bootstrap=30)
    got = ev.evaluate(fake)
    for m in ("fid", "kid", "precision", "recall"):
        assert got[f"{m}_low"] < got[f"{m}_high"], m
        assert len(ev.replicates[m]) == 30
    assert got["fid_low"] < got["fid"] * 1.5 and got["fid_high"] > got["fid"] * 0.5
    assert got["precision_low"] <= got["precision"] <= got["precision_high"]
    assert "fid_low" not in Evaluator(reference_from_images(real, "real"), ["fid"], pixels,
                                      cache_dir=tmp_path).evaluate(fake)
    with pytest.raises(ValueError, match="callbacks.eval.bootstrap"):
        Evaluator(reference_from_images(real, "real"), ["fid"], pixels, bootstrap=-1)
