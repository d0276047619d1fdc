"""Training from cached tokenizer latents (written by `python -m scalegen.scaleout.cache_latents`): no image decoding.

On disk, per split (`<root>/train`, `<root>/val`): `index.json` and shards `latents_00000.npy` (n, 2, C, h, w) with
the image and its horizontal flip (MAR, FlowAR), `labels_00000.npy` (n,) int64. For a tokenizer with a posterior
(the KL VAE) the cache holds its moments (mean | logvar, 2C channels, before the scale factor), so every step still
draws a fresh posterior sample. Shards are opened memory-mapped: ImageNet's ~1.28M x 2 latents stream from disk.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scalegen.data.resume import ResumableData
from scalegen.io import resolve_path

FORMAT = "scalegen-latents/1"


def read_index(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "index.json"
    if not path.is_file():
        plan = folder / "plan.json"
        hint = (" (the caching did not finish: run the same `python -m scalegen.scaleout.cache_latents` command again to "
                "complete it)") if plan.is_file() else " (make it with `python -m scalegen.scaleout.cache_latents`)"
        raise FileNotFoundError(f"{path} not found{hint}")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


def batch_latent(tokenizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The generator's latent for a batch of this DataModule (what GeneratorModule trains on)."""
    if "moments" in batch:
        return tokenizer.latent_from_moments(batch["moments"])
    return batch["latents"].float()


def _mix(seed: int) -> int:
    """splitmix64: a well-spread 64-bit hash of a seed."""
    mask = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


class LatentShards(Dataset):
    """(latent or moments (C, h, w), label) from memory-mapped shards; with `flip`, the cached flipped copy half the
    time (seeded per sample under a ResumableSampler)."""

    def __init__(self, folder: str | Path, flip: bool = True):
        self.folder, self.flip = Path(folder), flip
        self.index = read_index(self.folder)
        self.kind = self.index["kind"]
        counts = [s["count"] for s in self.index["shards"]]
        self.ends = np.cumsum(counts)
        self._open: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per process: workers map their own

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._open:
            entry = self.index["shards"][k]
            self._open[k] = (np.load(self.folder / entry["latents"], mmap_mode="r"),
                             np.load(self.folder / entry["labels"], mmap_mode="r"))
        return self._open[k]

    def __getstate__(self):  # never pickle open memory maps into DataLoader workers
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, i):
        k = int(np.searchsorted(self.ends, int(i), side="right"))
        j = int(i) - (int(self.ends[k - 1]) if k else 0)
        latents, labels = self._shard(k)
        copy = 0
        if self.flip:  # the sample's own seed under a ResumableSampler (a hash: no RNG state to fork per sample)
            seed = getattr(i, "seed", None)
            copy = _mix(seed) % latents.shape[1] if seed is not None else int(torch.randint(0, latents.shape[1], ()))
        return torch.from_numpy(np.array(latents[j, copy], dtype=np.float32)), int(labels[j])


def collate_latents(kind: str):
    key = "moments" if kind == "moments" else "latents"

    def collate(samples):
        return {key: torch.stack([x for x, _ in samples]), "labels": torch.tensor([y for _, y in samples])}
    return collate


class LatentsDataModule(ResumableData, L.LightningDataModule):
    """Batches {"latents" or "moments": (B, C, h, w), "labels": (B,)} from a cache folder."""

    def __init__(self, root: str, batch_size: int = 64, num_workers: int = 4, flip: bool = True, seed: int = 0,
                 image_size: int | None = None):
        super().__init__()
        self.root, self.batch_size, self.num_workers = Path(root).expanduser(), batch_size, num_workers
        self.flip, self.seed, self.image_size = flip, seed, image_size
        self.train_set: LatentShards | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.root = Path(resolve_path(str(self.root)))
        self.train_set = LatentShards(self.root / "train", self.flip)
        cached = self.train_set.index.get("data", {}).get("image_size")
        if self.image_size is not None and cached is not None and cached != self.image_size:
            raise ValueError(f"data.image_size={self.image_size}, but {self.root} holds latents of {cached} px images")
        # validation: the cached val split, unflipped; else the first shard of train
        self.val_set = LatentShards(self.root / "val", False) if (self.root / "val" / "index.json").is_file() else None

    @property
    def num_classes(self) -> int:
        self.setup()
        return int(self.train_set.index["num_classes"])

    def tokenizer_for_run(self, tokenizer_cfg: dict, tokenizer_ckpt: str | None) -> str:
        """The tokenizer checkpoint a run from this cache must use; its config must be the cache's."""
        self.setup()
        index = self.train_set.index
        cached, tokenizer_cfg = index["tokenizer"], json.loads(json.dumps(tokenizer_cfg))
        diff = sorted(k for k in set(cached) | set(tokenizer_cfg) if cached.get(k) != tokenizer_cfg.get(k))
        if diff:
            raise ValueError(f"tokenizer: keys {diff} differ from those the cache {self.root} was made with "
                             f"({ {k: cached.get(k) for k in diff} }); pick the same tokenizer config")
        return tokenizer_ckpt or index["tokenizer_ckpt"]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = self.train_set
        return DataLoader(data, batch_size=self.batch_size, collate_fn=collate_latents(data.kind),
                          sampler=self.train_sampler(data, self.seed, self.batch_size),
                          generator=torch.Generator().manual_seed(self.seed),
                          drop_last=len(data) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        self.setup()
        data = self.val_set
        if data is None:
            data = torch.utils.data.Subset(LatentShards(self.root / "train", False),
                                           range(min(len(self.train_set), self.train_set.index["shards"][0]["count"])))
        kind = self.train_set.kind
        return DataLoader(data, batch_size=self.batch_size, collate_fn=collate_latents(kind), shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
