"""An honest metric on the built-in digits: a small classifier trained once on the real digits, cached.

Its pooled features replace InceptionV3 (which never saw an 8x8 digit and costs 0.4 s per image on CPU) as the
feature space of FID/KID/precision/recall, and its predictions give the *class accuracy* of a class-conditional
generator: how often the classifier recognises the class a sample was conditioned on. It is registered with
torch-fidelity as the feature extractor `scalegen-digits`, so `torch_fidelity.calculate_metrics(...,
feature_extractor="scalegen-digits", feature_extractor_weights_path=<file>)` works too.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import track

from scalegen.data import DigitsDataModule
from scalegen.io import load_strict, save_safetensors

FEATURE_EXTRACTOR = "scalegen-digits"
FILE_NAME = "digits_classifier.safetensors"
SIZE = 16  # the classifier's input side (the digits are 8x8 scans); other sizes are resized to it


def cache_dir() -> Path:
    """$SCALEGEN_CACHE, else $XDG_CACHE_HOME/scalegen, else ~/.cache/scalegen."""
    if os.environ.get("SCALEGEN_CACHE"):
        return Path(os.environ["SCALEGEN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "scalegen"


def default_path() -> Path:
    return cache_dir() / FILE_NAME


class DigitsClassifier(nn.Module):
    """Three conv stages and a linear layer; the 64-d pooled vector is the feature space of the metrics."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.stages = nn.ModuleList([stage(1, 16), stage(16, 32), stage(32, self.feature_dim)])
        self.fc = nn.Linear(self.feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,C,H,W) or float in [-1,1] -> gray float (B,1,16,16) in [-1,1]."""
        x = images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()
        x = x.mean(1, keepdim=True)  # the digits are gray repeated as RGB; a generator's colour cast is averaged out
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        for i, s in enumerate(self.stages):
            x = s(x)
            if i < len(self.stages) - 1:
                x = F.max_pool2d(x, 2)
        return x.mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


def _digits(split_seed: int = 0, val_fraction: float = 0.1):
    # at the generators' default 32 px: `prepare` then brings them to 16 px exactly as it does generated images
    data = DigitsDataModule(image_size=32, channels=1, val_fraction=val_fraction, split_seed=split_seed)
    return data.real_images("train"), data.real_images("val")


def train_classifier(steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0, shift: int = 3,
                     log=print) -> tuple[DigitsClassifier, dict]:
    """Train on the train split of the built-in digits (the generator's own split), test on its val split."""
    (x_tr, y_tr), (x_te, y_te) = _digits()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()
    model.train()
    for step in track(range(steps), description="[scalegen] digits classifier", transient=True):
        idx = torch.randint(0, len(y_tr), (batch_size,), generator=g)
        x = x_tr[idx]
        # random shifts (background -1) and a little contrast jitter: generated digits are never pixel-aligned
        dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
        x = torch.roll(F.pad(x, (shift,) * 4, value=-1.0), (dy, dx), dims=(2, 3))[..., shift:-shift, shift:-shift]
        x = (x * (0.8 + 0.4 * torch.rand(batch_size, 1, 1, 1, generator=g))).clamp(-1, 1)
        loss = F.cross_entropy(model(x), y_tr[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    acc = accuracy(model, x_te, y_te)
    info = {"test_accuracy": acc, "test_images": len(y_te), "train_images": len(y_tr), "steps": steps, "seed": seed,
            "data": "scikit-learn load_digits, DigitsDataModule split val_fraction=0.1 split_seed=0",
            "train_seconds": round(time.time() - start, 1)}
    log(f"[scalegen] digits classifier: test accuracy {acc:.4f} on {len(y_te)} held-out real digits "
        f"({steps} steps, {info['train_seconds']} s)")
    return model, info


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    preds = torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return (preds.cpu() == labels.cpu()).float().mean().item()


def save_classifier(model: DigitsClassifier, info: dict, path: str | os.PathLike) -> Path:
    return save_safetensors(model.state_dict(), path, metadata={"scalegen": json.dumps(info)})


def load_classifier(path: str | os.PathLike) -> tuple[DigitsClassifier, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digits classifier not found: {path} (it is trained on first use by "
                                "scalegen.eval.classifier.ensure_classifier, or `python -m scalegen.eval.classifier`)")
    with safe_open(str(path), "pt") as f:
        info = json.loads((f.metadata() or {}).get("scalegen", "{}"))
    model = DigitsClassifier()
    load_strict(model, load_file(str(path)), f"digits classifier {path}")
    return model.eval().requires_grad_(False), info


def ensure_classifier(path: str | os.PathLike | None = None, log=print) -> tuple[Path, dict]:
    """The classifier file (trained and written on first use) and its info, test accuracy included."""
    path = Path(path).expanduser() if path else default_path()
    if not path.is_file():
        log(f"[scalegen] training the digits classifier once, cached at {path}")
        model, info = train_classifier(log=log)
        save_classifier(model, info, path)
    _, info = load_classifier(path)
    return path, info


def file_tag(path: str | os.PathLike) -> str:
    """A short content tag of a weights file: cached features of an older classifier are never reused."""
    import hashlib
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:10]


# -- torch-fidelity ------------------------------------------------------------------------------------------------
def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatureExtractor(FeatureExtractorBase):
        """uint8 (B,3,H,W) -> (64-d pooled features, logits); weights from `feature_extractor_weights_path`."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.model, self.info = load_classifier(feature_extractor_weights_path or default_path())

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits"}.get(metric, "features")

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)

        def forward(self, x):
            feats = self.model.features(x)
            out = {"features": feats, "logits": self.model.fc(feats)}
            return tuple(out[name] for name in self.features_list)

    return DigitsFeatureExtractor


def register() -> str:
    """Register `scalegen-digits` with torch-fidelity (once per process); returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if FEATURE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FEATURE_EXTRACTOR, _extractor_class())
    return FEATURE_EXTRACTOR


if __name__ == "__main__":  # python -m scalegen.eval.classifier [path]: train (or show) the cached classifier
    import sys
    p, meta = ensure_classifier(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"{p}: {meta}")
