"""Error bars: bootstrap intervals of the sample metrics, across-seed intervals, and whether two runs differ.

Over samples: the generated set's features are resampled with replacement B times (seeded; the reference is fixed,
as it is for every run being compared) and each metric is recomputed on every resample, so a metric's interval is
the percentile interval of its B replicates. The replicates are cheap forms of the same statistics: FID from the
reference covariance's square root computed once (tr sqrt(S R) = tr sqrt(R^1/2 S R^1/2), one symmetric
eigendecomposition per resample), precision/recall from the k-NN balls of the full sets (a resample with duplicates
would shrink its own balls to zero), class accuracy as a mean of per-image hits, KID with torch-fidelity's own
estimator on fewer subsets (its subset noise makes that interval a little wide, never narrow).

A resample with replacement repeats images, which biases set statistics (FID up, recall down: on 180 real digits
the replicates' FID centred at 4x the full set's). The interval is therefore taken from the replicates re-centred on
the full-set value (bias-corrected percentile): its width is the bootstrap's, its centre the estimate.

Two runs differ when the interval of their *difference* excludes 0: the difference of independent replicates (two
generated sets are independent given the shared reference) for one seed each, Welch's t interval for several seeds
each. Non-overlapping intervals would be a stricter test than the stated confidence (two 95% intervals can overlap
while the difference is significant), so it is not the one used.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

CONFIDENCE = 0.95
KID_SUBSETS = 10  # subsets per resample: B x torch-fidelity's 100 would cost minutes with 2048-d features


def percentile_interval(replicates: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    r = np.asarray(replicates, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return math.nan, math.nan
    a = (1 - confidence) / 2
    return float(np.quantile(r, a)), float(np.quantile(r, 1 - a))


# -- FID ------------------------------------------------------------------------------------------------------------
class FidReplicates:
    """FID of many feature sets against one reference (mu, sigma), its covariance's square root computed once."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        self.mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)
        sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
        w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * w.clamp_min(0).sqrt()) @ v.T
        self.trace = float(torch.trace(sigma))

    def __call__(self, feats: torch.Tensor) -> float:
        x = feats.to(torch.float64)
        mu, centred = x.mean(0), x - x.mean(0)
        cov = centred.T @ centred / max(len(x) - 1, 1)  # np.cov's unbiased estimate, as torch-fidelity's statistics
        eig = torch.linalg.eigvalsh(self.root @ cov @ self.root).clamp_min(0)
        diff = mu - self.mu
        return float(diff @ diff + torch.trace(cov) + self.trace - 2 * eig.sqrt().sum())


# -- precision / recall ---------------------------------------------------------------------------------------------
def knn_radii(feats: torch.Tensor, k: int, batch: int = 4096) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour (itself excluded), torch-fidelity's manifold radius."""
    return torch.cat([torch.cdist(f, feats).kthvalue(k + 1, dim=1).values for f in feats.split(batch)])


def prc_hits(gen: torch.Tensor, ref: torch.Tensor, k: int, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(gen_in_ref: (Ng,) bool, a generated image inside a reference ball; covers: (Nr, Ng) bool, generated image j's
    ball holds reference image i). precision = gen_in_ref.mean(); recall = covers.any(1).mean()."""
    gen, ref = gen.double(), ref.double()
    r_ref, r_gen = knn_radii(ref, k, batch), knn_radii(gen, k, batch)
    in_ref = torch.cat([(torch.cdist(g, ref) <= r_ref).any(1) for g in gen.split(batch)])
    covers = torch.cat([torch.cdist(r, gen) <= r_gen for r in ref.split(batch)])
    return in_ref, covers


# -- all metrics ----------------------------------------------------------------------------------------------------
def replicates(feats: Mapping[str, torch.Tensor], layers: Mapping[str, str], *, count: int, seed: int = 0,
               ref_stats: Mapping[str, np.ndarray] | None = None, ref_feats: Mapping[str, torch.Tensor] | None = None,
               labels: torch.Tensor | None = None, kid_opts: Mapping | None = None,
               prc_neighborhood: int = 3) -> dict[str, np.ndarray]:
    """{metric: (count,) replicates} of fid, kid, precision, recall, class_acc (those `layers` names; class_acc
    needs `labels`), one resample of the generated images shared by every metric."""
    n = len(next(iter(feats.values())))
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(n, (n,), generator=gen) for _ in range(count)]
    out: dict[str, list[float]] = {}
    if "fid" in layers:
        fid = FidReplicates(ref_stats["mu"], ref_stats["sigma"])
        out["fid"] = [fid(feats[layers["fid"]][i]) for i in draws]
    if "kid" in layers:
        from torch_fidelity.metric_kid import kid_features_to_metric
        opts = {**(kid_opts or {}), "kid_subsets": KID_SUBSETS, "verbose": False}
        out["kid"] = [kid_features_to_metric(feats[layers["kid"]][i], ref_feats[layers["kid"]],
                                             **{**opts, "rng_seed": seed + b})["kernel_inception_distance_mean"]
                      for b, i in enumerate(draws)]
    if "prc" in layers:
        in_ref, covers = prc_hits(feats[layers["prc"]], ref_feats[layers["prc"]], prc_neighborhood)
        out["precision"] = [in_ref[i].double().mean().item() for i in draws]
        # a resample covers reference i if any image it drew does: one product for all resamples
        drawn = torch.stack([torch.bincount(i, minlength=n) > 0 for i in draws]).float()  # (count, Ng)
        out["recall"] = ((covers.float() @ drawn.T) > 0).double().mean(0).tolist()
    if "class_acc" in layers and labels is not None:
        hits = (feats[layers["class_acc"]].argmax(1) == labels.cpu()).double()
        out["class_acc"] = [hits[i].mean().item() for i in draws]
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def recentred(replicates: Sequence[float], estimate: float) -> np.ndarray:
    """The replicates shifted so that their mean is the full-set estimate (removes the resampling bias)."""
    r = np.asarray(replicates, dtype=np.float64)
    finite = r[np.isfinite(r)]
    return r - (finite.mean() - estimate) if finite.size else r


def intervals(reps: Mapping[str, Sequence[float]], estimates: Mapping[str, float],
              confidence: float = CONFIDENCE) -> dict[str, float]:
    """{metric}_low / {metric}_high for every metric's replicates, re-centred on its full-set value."""
    out = {}
    for k, r in reps.items():
        out[f"{k}_low"], out[f"{k}_high"] = percentile_interval(recentred(r, estimates[k]), confidence)
    return out


# -- across seeds, and differences ----------------------------------------------------------------------------------
def seed_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean over seeds (n >= 2)."""
    from scipy import stats
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return mean, float(mean - half), float(mean + half)


def difference_from_replicates(a: Sequence[float], b: Sequence[float], estimate: float,
                               confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of A - B from the independent replicates of two runs (paired by index: draws of the product),
    re-centred on the difference of the full-set values `estimate`."""
    m = min(len(a), len(b))
    return percentile_interval(recentred(np.asarray(a[:m]) - np.asarray(b[:m]), estimate), confidence)


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Welch's t interval of mean(A) - mean(B) over seeds (each with at least 2 values)."""
    from scipy import stats
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    if se == 0:
        return diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf((1 + confidence) / 2, df) * se
    return float(diff - half), float(diff + half)


def significant(low: float, high: float) -> bool | None:
    """The interval of a difference excludes 0 (None: no interval)."""
    if math.isnan(low) or math.isnan(high):
        return None
    return bool(low > 0 or high < 0)
