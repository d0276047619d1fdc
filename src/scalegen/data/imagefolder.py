"""Images in the ImageNet layout `root/train/<class>/*` (and optionally `root/val/<class>/*`).

An unreadable file never stops an epoch: the dataset returns a marker for it,
the collate drops it, and the loader (in the main process, whatever the number
of workers) warns once per file and counts it in `ImageFolderDataModule.skipped`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from scalegen.data.digits import stratified_split
from scalegen.data.resume import ResumableData, seeded_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion), the preprocessing of VAR, FlowAR and MAR."""
    # halve with BOX first: a single BICUBIC downscale by a large factor aliases
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - image_size) // 2, (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale PNGs open as I;16 (or I on older Pillow)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit samples are scaled (v * 255 / 65535), where PIL's own convert clips them at 255."""
    if image.mode in WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide * (255 / 65535)), 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass(frozen=True)
class Unreadable:
    """What the dataset returns in place of a sample whose file could not be decoded."""

    path: str
    error: str


class ImageFiles(Dataset):
    """(transformed image, class index) for a list of (path, class index)."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[int(i)]
        try:
            with Image.open(path) as image:
                image = to_rgb(image)  # forces the full decode inside the try
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            # OSError covers UnidentifiedImageError and "image file is truncated"
            return Unreadable(path, f"{type(error).__name__}: {error}")
        with seeded_rng(i):  # the sample's own seed under a ResumableSampler: the same flips after a resume
            return self.transform(image), label


def collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[Unreadable]]:
    """Stack the readable samples; hand the unreadable ones on so the main process can count them."""
    good = [sample for sample in batch if not isinstance(sample, Unreadable)]
    bad = [sample for sample in batch if isinstance(sample, Unreadable)]
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), bad
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, bad


class SkippingDataLoader(DataLoader):
    """A DataLoader over `ImageFiles` that yields (images, labels) and reports dropped files.

    The collate runs inside the worker processes, so the dropped files travel with the
    batch and are reported here, in the process that iterates.
    """

    def __init__(self, dataset: Dataset, *, on_skipped: Callable[[list[Unreadable]], None] | None = None, **kwargs):
        kwargs.setdefault("collate_fn", collate_skipping)
        super().__init__(dataset, **kwargs)
        self.on_skipped = on_skipped  # same name as the argument, so Lightning can rebuild it with a DDP sampler

    def batch_of(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The readable samples of `indices` as one (images, labels) batch, as iteration gives it (no worker starts)."""
        images, labels, _ = self.collate_fn([self.dataset[i] for i in indices])
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, bad in super().__iter__():
            if bad and self.on_skipped is not None:
                self.on_skipped(bad)
            # a batch with no readable image has nothing to train on (rare: a whole batch of bad files)
            if len(labels):
                yield images, labels


def find_classes(directory: Path) -> list[str]:
    """Sorted class folder names, like torchvision's ImageFolder (hidden folders such as .ipynb_checkpoints skipped)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def list_images(directory: Path, class_to_idx: dict[str, int], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """Sorted (path, class index) of every image under directory/<class>/ (recursively)."""
    samples, empty = [], []
    for name, idx in class_to_idx.items():
        found = []
        for folder, _, files in os.walk(directory / name, followlinks=True):
            found += [os.path.join(folder, f) for f in files if f.lower().endswith(extensions)]
        if not found:
            empty.append(name)
        samples += [(path, idx) for path in sorted(found)]
    if empty:
        shown = ", ".join(str(directory / name) for name in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise FileNotFoundError(
            f"{len(empty)} class folder(s) hold no image with extension in {extensions}: {shown}. "
            "Remove them or add images; class indices come from the folder names."
        )
    return samples


class ImageFolderDataModule(ResumableData, L.LightningDataModule):
    """ImageNet-layout folders as (B, 3, H, W) float32 images in [-1, 1] and int64 labels."""

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 256,
        batch_size: int = 64,
        num_workers: int = 8,
        hflip: bool = True,
        val_fraction: float = 0.01,
        split_seed: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        super().__init__()
        self.root, self.image_size, self.batch_size = Path(root).expanduser(), image_size, batch_size
        self.num_workers, self.hflip, self.val_fraction, self.split_seed = num_workers, hflip, val_fraction, split_seed
        self.extensions = tuple("." + e.lower().lstrip(".") for e in extensions)
        self.skipped = 0  # unreadable samples dropped so far, over all loaders and epochs
        self.unreadable_files: set[str] = set()
        self.classes: list[str] | None = None

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            self.setup()
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.classes is not None:
            return
        train_dir, val_dir = self.root / "train", self.root / "val"
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} does not exist (expected {train_dir}/<class>/*)")
        if not train_dir.is_dir():
            raise FileNotFoundError(f"{train_dir} does not exist; the layout is root/train/<class>/* (val optional)")
        classes = find_classes(train_dir)
        if not classes:
            raise FileNotFoundError(f"{train_dir} has no class folders; the layout is root/train/<class>/*")
        class_to_idx = {name: i for i, name in enumerate(classes)}
        train = list_images(train_dir, class_to_idx, self.extensions)
        if val_dir.is_dir():
            val_classes = find_classes(val_dir)
            unknown = sorted(set(val_classes) - set(classes))
            if not val_classes or unknown:
                found = f"folders not in train: {unknown[:5]}" if unknown else "no class folders"
                raise FileNotFoundError(
                    f"{val_dir} has {found}; the layout is root/val/<train class>/*. "
                    "Sort the val images into the train class folders, or remove val/ to hold out part of train."
                )
            val = list_images(val_dir, {c: class_to_idx[c] for c in val_classes}, self.extensions)
        else:
            train_idx, val_idx = stratified_split(np.array([y for _, y in train]), self.val_fraction, self.split_seed)
            train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
        self.classes, self.class_to_idx = classes, class_to_idx
        self.train_samples, self.val_samples = train, val

    def transform(self, train: bool) -> Callable:
        steps = [partial(center_crop_arr, image_size=self.image_size)]
        if train and self.hflip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]  # [0, 1] -> [-1, 1]
        return transforms.Compose(steps)

    def _count_skipped(self, bad: list[Unreadable]) -> None:
        self.skipped += len(bad)
        for sample in bad:
            if sample.path not in self.unreadable_files:
                self.unreadable_files.add(sample.path)
                warnings.warn(f"skipping unreadable image {sample.path} ({sample.error})", stacklevel=2)

    def _loader(self, samples: list, train: bool) -> SkippingDataLoader:
        dataset = ImageFiles(samples, self.transform(train))
        return SkippingDataLoader(
            dataset,
            on_skipped=self._count_skipped,
            batch_size=self.batch_size,
            # train: order fixed by (seed, epoch), position and flips restored on resume (scalegen.data.resume)
            sampler=self.train_sampler(dataset, self.split_seed, self.batch_size) if train else None,
            generator=torch.Generator().manual_seed(self.split_seed),  # worker seeds never draw from the global RNG
            drop_last=train and len(samples) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> SkippingDataLoader:
        self.setup()
        return self._loader(self.train_samples, train=True)

    def val_dataloader(self) -> SkippingDataLoader:
        self.setup()
        return self._loader(self.val_samples, train=False)
