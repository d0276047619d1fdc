"""FID, KID, precision/recall, IS (and class accuracy) through torch-fidelity, offline.

Features come from a torch-fidelity feature extractor: InceptionV3 (`inception`, the papers' evaluator, weights from a
local file) or the small digits classifier (`digits`, see classifier.py). The metrics are torch-fidelity's own
functions on those features. A reference is an image folder, an `.npz` (ADM reference batch: `mu`/`sigma` for FID,
`arr_0` images for the rest) or in-memory images; its features/statistics are cached (numpy files, read without
pickle) and reused. Every check that can fail runs in `Evaluator.check`, before anything is generated.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scalegen.eval import classifier
from scalegen.eval.bootstrap import intervals, replicates
from scalegen.io import atomic_write

METRICS = ("fid", "kid", "prc", "isc", "class_acc")
EXTRACTORS = {"inception": "inception-v3-compat", "digits": "scalegen-digits"}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class UInt8Images(Dataset):
    """A uint8 (N,3,H,W) tensor as the bare-tensor Dataset torch-fidelity expects (TensorDataset gives tuples)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N,3,H,W), got {tuple(images.shape)} {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) in [0,1] -> uint8 (B,3,H,W), rounded as sample.py's PNGs are."""
    x = images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def inception_weights(path: str | os.PathLike | None) -> Path:
    """The local InceptionV3 file; missing -> an error that says which file to get and where to put it."""
    default = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE  # where torch-fidelity itself would look
    p = Path(path).expanduser() if path else default
    if not p.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights not found at {p}. Nothing is downloaded at run time: on a machine with internet get "
            f"{INCEPTION_FILE} ({INCEPTION_URL}, ~91 MB) and put it at {p}"
            + ("" if path else f", or anywhere and set callbacks.eval.inception_weights=/path/to/{INCEPTION_FILE}"))
    # a plain tensor file (weights_only), so torch-fidelity's own load of it (weights_only=False) runs no pickle code
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{p} is not torch-fidelity's InceptionV3 state dict ({INCEPTION_FILE})")
    return p


# -- references ----------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """What generated images are compared with: images, and/or precomputed FID statistics (mu, sigma)."""

    name: str                                  # cache key: changes whenever the content does
    description: str
    count: int                                 # number of reference images (0: statistics only)
    image_size: tuple[int, int] | None
    load_images: Callable[[], torch.Tensor] | None = None   # -> uint8 (N,3,H,W)
    stats: dict[str, np.ndarray] | None = None               # {"mu", "sigma"}, e.g. from the ADM reference batch


def _digest(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:12]


def reference_from_images(images: torch.Tensor, name: str, description: str = "") -> Reference:
    images = to_uint8(images) if images.dtype != torch.uint8 else images
    UInt8Images(images)  # shape check
    tag = _digest(images.numpy().tobytes())
    return Reference(f"{name}-{tag}", description or name, len(images), tuple(images.shape[-2:]), lambda: images)


def reference_from_folder(path: str | os.PathLike) -> Reference:
    """Every .png/.jpg/.jpeg under `path` (class sub-folders included, ImageNet layout)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"reference folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"reference folder {root} holds no {'/'.join(IMAGE_EXTS)} images")
    from PIL import Image
    with Image.open(files[0]) as im:
        w, h = im.size
    tag = _digest(root.resolve(), *[f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files])

    def load() -> torch.Tensor:
        out = []
        for f in files:
            with Image.open(f) as im:
                arr = np.array(im.convert("RGB"))
            if arr.shape[:2] != (h, w):
                raise ValueError(f"{f} is {arr.shape[1]}x{arr.shape[0]}, the other reference images {w}x{h}: "
                                 "resize the reference folder to one size")
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        return torch.stack(out)

    return Reference(f"folder-{root.name}-{tag}", f"image folder {root} ({len(files)} images)", len(files), (h, w), load)


def reference_from_npz(path: str | os.PathLike) -> Reference:
    """An ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: `arr_0` uint8 NHWC images, `mu`, `sigma`) or any
    `.npz` with `mu`/`sigma` (FID only) or with `arr_0` (every metric)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference statistics not found: {p}")
    with np.load(p, allow_pickle=False) as f:
        keys = set(f.files)
        stats = {"mu": f["mu"], "sigma": f["sigma"]} if {"mu", "sigma"} <= keys else None
        shape = _npz_shape(p, "arr_0") if "arr_0" in keys else None  # header only: ADM's images are 1.9 GB
        size = tuple(int(s) for s in f["image_size"]) if "image_size" in keys else (shape[1:3] if shape else None)
    if stats is None and shape is None:
        raise ValueError(f"{p} has neither `mu`/`sigma` (FID statistics) nor `arr_0` (images); keys: {sorted(keys)}")
    if stats is not None and (stats["mu"].ndim != 1 or stats["sigma"].shape != (len(stats["mu"]),) * 2):
        raise ValueError(f"{p}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} are not (D,) and (D,D)")

    def load() -> torch.Tensor:
        with np.load(p, allow_pickle=False) as f:
            return torch.from_numpy(np.ascontiguousarray(f["arr_0"])).permute(0, 3, 1, 2).contiguous()

    st = p.stat()
    return Reference(f"npz-{p.stem}-{_digest(p.resolve(), st.st_size, st.st_mtime_ns)}", f"{p.name}",
                     shape[0] if shape else 0, size, load if shape else None, stats)


def _npz_shape(path: Path, key: str) -> tuple[int, ...]:
    import zipfile
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(fh)[0]


def reference_from_path(path: str | os.PathLike) -> Reference:
    return reference_from_npz(path) if str(path).endswith(".npz") else reference_from_folder(path)


# -- the evaluator ---------------------------------------------------------------------------------------------------
class Evaluator:
    """Features with a torch-fidelity extractor, metrics with torch-fidelity's functions, cached reference."""

    def __init__(self, reference: Reference, metrics: Sequence[str] = ("fid", "kid", "prc"),
                 feature_extractor: str = "inception", *, weights: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, kid_subset_size: int = 1000, kid_subsets: int = 100,
                 prc_neighborhood: int = 3, isc_splits: int = 10, batch_size: int = 64,
                 device: str | torch.device = "cpu", seed: int = 2020, bootstrap: int = 0):
        if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
            raise ValueError(f"callbacks.eval.bootstrap: {bootstrap!r} must be an integer >= 0 (resamples; 0 = off)")
        self.bootstrap = bootstrap
        self.replicates: dict[str, np.ndarray] = {}  # of the last `score`, by metric (bootstrap > 0)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ValueError(f"callbacks.eval.metrics: {bad or 'empty'}; allowed: {list(METRICS)}")
        self.reference, self.metrics = reference, list(metrics)
        self.opts = dict(kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, prc_neighborhood=prc_neighborhood,
                         isc_splits=isc_splits, rng_seed=seed, verbose=False, save_cpu_ram=True)
        self.batch_size, self.device = batch_size, torch.device(device)
        name = EXTRACTORS.get(feature_extractor, feature_extractor)  # or any name registered with torch-fidelity
        if name == classifier.FEATURE_EXTRACTOR:
            classifier.register()
            self.weights = Path(weights).expanduser() if weights else classifier.default_path()
            if not self.weights.is_file():
                raise FileNotFoundError(f"digits classifier not found: {self.weights} (train it once: "
                                        f"python -m scalegen.eval.classifier {self.weights})")
            self.tag = f"{name}-{classifier.file_tag(self.weights)}"
        elif name == EXTRACTORS["inception"]:
            self.weights, self.tag = inception_weights(weights), name
        else:
            self.weights, self.tag = (Path(weights) if weights else None), name
        if "class_acc" in self.metrics and name != classifier.FEATURE_EXTRACTOR:
            raise ValueError("callbacks.eval.metrics: class_acc needs feature_extractor=digits (the classifier), "
                             f"not {feature_extractor!r}")
        self.name = name
        self.layers = {m: self._layer(m) for m in ("fid", "kid", "prc", "isc") if m in self.metrics}
        if "class_acc" in self.metrics:
            self.layers["class_acc"] = "logits"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else classifier.cache_dir() / "fidelity"
        self._extractor = None
        self._ref_features: dict[str, torch.Tensor] | None = None

    def _layer(self, metric: str) -> str:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        if self.name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"feature extractor {self.name!r} is not registered with torch-fidelity; "
                             f"use one of {sorted(EXTRACTORS)}")
        return FEATURE_EXTRACTORS_REGISTRY[self.name].get_default_feature_layer_for_metric(metric)

    # -- checks before generating --------------------------------------------------------------------------------------
    def check(self, num_generated: int, image_size: int | Sequence[int] | None = None) -> None:
        """Raise, naming the fix, if these metrics cannot be computed for `num_generated` images of `image_size`."""
        ref, o = self.reference, self.opts
        need_images = [m for m in ("kid", "prc") if m in self.metrics]
        if need_images and ref.load_images is None:
            raise ValueError(f"callbacks.eval.metrics {need_images} need reference images, but {ref.description} only holds "
                             "FID statistics (mu/sigma): give an image folder or an .npz with arr_0")
        if "fid" in self.metrics and ref.stats is not None and ref.stats["mu"].shape[0] != self._feature_dim():
            raise ValueError(f"{ref.description}: its FID statistics are {ref.stats['mu'].shape[0]}-d, the "
                             f"{self.name} features {self._feature_dim()}-d: statistics of another feature extractor")
        knob = {"fid": (2, None), "kid": (o["kid_subset_size"], "kid_subset_size"),
                "prc": (o["prc_neighborhood"] + 1, "prc_neighborhood"), "isc": (o["isc_splits"], "isc_splits")}
        for m in self.metrics:
            if m == "class_acc":
                continue
            need, key = knob[m]
            why = f"callbacks.eval.{key} = {o[key]}" if key else "a covariance"
            fix = f"lower callbacks.eval.{key}" if key else "use more images"
            n_ref = ref.count if (ref.stats is None or m != "fid") else None  # FID from given statistics needs none
            if n_ref is not None and m != "isc" and n_ref < need:
                raise ValueError(f"{ref.description} has {n_ref} images, too few for {m} ({why}, needs {need}): "
                                 f"add reference images or {fix}")
            if num_generated < need:
                raise ValueError(f"{num_generated} generated images are too few for {m} ({why}, needs {need}): "
                                 f"generate more (callbacks.eval.per_class) or {fix}")
        if image_size is not None and ref.image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if tuple(ref.image_size) != size:
                raise ValueError(f"generated images are {size[0]}x{size[1]}, the reference ({ref.description}) "
                                 f"{ref.image_size[0]}x{ref.image_size[1]}: compare images of one size")

    def _feature_dim(self) -> int:
        return int(self.features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[self.layers["fid"]].shape[1])

    # -- features ------------------------------------------------------------------------------------------------------
    @property
    def extractor(self):
        if self._extractor is None:
            from torch_fidelity.utils import create_feature_extractor
            layers = sorted(set(self.layers.values()))
            kw = {"feature_extractor_weights_path": str(self.weights)} if self.weights else {}
            self._extractor = create_feature_extractor(self.name, layers, cuda=False, verbose=False, **kw).to(self.device)
        return self._extractor

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (N,3,H,W) -> {layer: float (N, D)} on the CPU."""
        UInt8Images(images)
        fe, out = self.extractor, {}
        for i in range(0, len(images), self.batch_size):
            feats = fe.convert_features_tuple_to_dict(fe(images[i:i + self.batch_size].to(self.device)))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    def reference_features(self) -> dict[str, torch.Tensor]:
        """The reference's features, cached as `{name}-{extractor}-features-{layer}.npy` (torch-fidelity's naming)."""
        if self._ref_features is None:
            layers = sorted({self.layers[m] for m in ("fid", "kid", "prc") if m in self.layers})
            paths = {l: self.cache_dir / f"{self.reference.name}-{self.tag}-features-{l}.npy" for l in layers}
            if all(p.is_file() for p in paths.values()):
                self._ref_features = {l: torch.from_numpy(np.load(p, allow_pickle=False)) for l, p in paths.items()}
            else:
                feats = self.features(self.reference.load_images())
                for l, p in paths.items():
                    _atomic_numpy(p, np.save, feats[l].numpy())
                self._ref_features = {l: feats[l] for l in layers}
        return self._ref_features

    def reference_fid_stats(self) -> dict[str, np.ndarray]:
        if self.reference.stats is not None:
            return self.reference.stats
        path = self.cache_dir / f"{self.reference.name}-{self.tag}-stat-fid-{self.layers['fid']}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return {"mu": f["mu"], "sigma": f["sigma"]}
        from torch_fidelity.metric_fid import fid_features_to_statistics
        stats = fid_features_to_statistics(self.reference_features()[self.layers["fid"]])
        _atomic_numpy(path, lambda f, s: np.savez(f, **s), stats)
        return stats

    # -- metrics -------------------------------------------------------------------------------------------------------
    def score(self, feats: dict[str, torch.Tensor], labels: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of generated features (from `features`) against the reference: fid, kid, kid_std, precision,
        recall, isc, isc_std, class_acc (with `labels`, the classes the images were conditioned on); with
        `bootstrap` resamples also `{metric}_low`/`{metric}_high` (scalegen.eval.bootstrap), the replicates kept in
        `self.replicates`."""
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric
        out, o = {}, self.opts
        if "fid" in self.metrics:
            out["fid"] = fid_statistics_to_metric(*_same_dtypes(fid_features_to_statistics(feats[self.layers["fid"]]),
                                                                self.reference_fid_stats()), False)[KEY_METRIC_FID]
        if "kid" in self.metrics:
            ref = self.reference_features()[self.layers["kid"]]
            r = kid_features_to_metric(feats[self.layers["kid"]], ref, **o)
            out["kid"], out["kid_std"] = r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"]
        if "prc" in self.metrics:
            ref = self.reference_features()[self.layers["prc"]]
            r = prc_features_to_metric(feats[self.layers["prc"]], ref, **o)
            out["precision"], out["recall"] = r["precision"], r["recall"]
        if "isc" in self.metrics:
            r = isc_features_to_metric(feats[self.layers["isc"]], o["isc_splits"], True, o["rng_seed"])
            out["isc"], out["isc_std"] = r["inception_score_mean"], r["inception_score_std"]
        if "class_acc" in self.metrics:
            if labels is None:
                raise ValueError("class_acc needs the labels the images were generated for")
            out["class_acc"] = (feats["logits"].argmax(1) == labels.cpu()).float().mean().item()
        if self.bootstrap:
            self.replicates = self.bootstrap_replicates(feats, labels)
            out.update(intervals(self.replicates, out))
        return out

    def bootstrap_replicates(self, feats: dict[str, torch.Tensor], labels: torch.Tensor | None) -> dict:
        layers = {m: l for m, l in self.layers.items() if m != "isc"}  # IS has its own split spread (isc_std)
        needs_ref = any(m in layers for m in ("kid", "prc"))
        return replicates(feats, layers, count=self.bootstrap, seed=self.opts["rng_seed"], labels=labels,
                          ref_stats=self.reference_fid_stats() if "fid" in layers else None,
                          ref_feats=self.reference_features() if needs_ref else None,
                          kid_opts={k: self.opts[k] for k in ("kid_subset_size",)},
                          prc_neighborhood=self.opts["prc_neighborhood"])

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        self.check(len(images), tuple(images.shape[-2:]))
        return self.score(self.features(images), labels)


def _atomic_numpy(path: Path, save, value) -> None:

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save/np.savez would otherwise append their own suffix
            save(f, value)

    atomic_write(path, write)


def _same_dtypes(a: dict, b: dict) -> tuple[dict, dict]:
    """torch-fidelity asserts equal dtypes; features give float32 mu / float64 sigma, ADM's npz float64 both."""
    cast = lambda s: {"mu": np.asarray(s["mu"], dtype=np.float64), "sigma": np.asarray(s["sigma"], dtype=np.float64)}
    return cast(a), cast(b)


def export_fid_stats_to_fidelity_cache(npz: str | os.PathLike, name: str, cache_root: str | os.PathLike,
                                       feature_extractor: str = EXTRACTORS["inception"], layer: str = "2048") -> Path:
    """Write an `.npz`'s mu/sigma as a torch-fidelity cache entry, so `fidelity --fid --input2-cache-name NAME`
    (or `calculate_metrics(input2_cache_name=NAME)`) uses them; mu float32 / sigma float64, the dtypes
    torch-fidelity's own statistics have (it asserts they match)."""
    with np.load(npz, allow_pickle=False) as f:
        stats = {"mu": f["mu"].astype(np.float32), "sigma": f["sigma"].astype(np.float64)}
    path = Path(cache_root) / f"{name}-{feature_extractor}-stat-fid-{layer}.pt"
    return atomic_write(path, lambda tmp: torch.save(stats, tmp))
