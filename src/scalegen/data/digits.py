"""The built-in dataset: scikit-learn's 8x8 handwritten digits, upsampled.

1,797 images in 10 classes that ship inside the scikit-learn wheel, so the
default run needs no download. The whole set is a few MB at 32x32, so it is
precomputed once in `setup` and served from memory.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from scalegen.data.resume import ResumableData, seeded_rng


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices, holding out round(val_fraction * n_c) of every class c."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    # legacy RandomState: its stream is frozen across numpy versions, so every machine gets the same split
    rng = np.random.RandomState(seed)
    order = np.argsort(labels, kind="stable")
    _, counts = np.unique(labels[order], return_counts=True)
    val = []
    for members in np.split(order, np.cumsum(counts)[:-1]):
        n_val = int(round(val_fraction * len(members)))
        val.append(members[rng.permutation(len(members))[:n_val]])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class AugmentedTensorImages(Dataset):
    """(image, label) pairs from in-memory tensors, with optional flip and translation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False, shift: int = 0):
        self.images, self.labels, self.hflip, self.shift = images, labels, hflip, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        with seeded_rng(i):  # the sample's own seed under a ResumableSampler: same draws after a resume
            if self.hflip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            if self.shift > 0:
                s, (h, w) = self.shift, image.shape[-2:]
                dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
                # pad with -1, the digits' background, so a shift never wraps strokes around the border
                image = F.pad(image, (s, s, s, s), value=-1.0)[:, dy : dy + h, dx : dx + w]
        return image, self.labels[int(i)]


class DigitsDataModule(ResumableData, L.LightningDataModule):
    """scikit-learn `load_digits()` as (B, C, H, W) float32 images in [-1, 1] and int64 labels."""

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        hflip: bool = False,
        augment_shift: int = 0,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (gray repeated as RGB), got {channels}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.val_fraction, self.split_seed, self.num_workers = val_fraction, split_seed, num_workers
        self.hflip, self.augment_shift = hflip, augment_shift
        self.images: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.images is not None:  # Lightning calls setup once per stage; the tensors never change
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float()[:, None] / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
        size = (self.image_size, self.image_size)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
        self.images = x.clamp_(-1.0, 1.0).repeat(1, self.channels, 1, 1).contiguous()  # bicubic overshoots
        self.labels = torch.from_numpy(digits.target).long()
        train, val = stratified_split(digits.target, self.val_fraction, self.split_seed)
        self.train_idx, self.val_idx = torch.from_numpy(train), torch.from_numpy(val)

    def real_images(self, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented (images, labels) of `split` ('train', 'val' or 'all'), for evaluation code."""
        self.setup()
        if split == "all":
            return self.images, self.labels
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        idx = self.train_idx if split == "train" else self.val_idx
        return self.images[idx], self.labels[idx]

    def train_dataloader(self) -> DataLoader:
        images, labels = self.real_images("train")
        dataset = AugmentedTensorImages(images, labels, hflip=self.hflip, shift=self.augment_shift)
        drop_last = len(dataset) > self.batch_size  # never drop the only batch of a tiny train set
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # order fixed by (seed, epoch), position and augmentations restored on resume (scalegen.data.resume)
            sampler=self.train_sampler(dataset, self.split_seed, self.batch_size),
            generator=torch.Generator().manual_seed(self.split_seed),  # worker seeds never draw from the global RNG
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        images, labels = self.real_images("val")
        return DataLoader(
            AugmentedTensorImages(images, labels),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
