"""Data modules: the built-in digits and the ImageNet-layout image folder (offline, seconds)."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from scalegen.data import DigitsDataModule, ImageFolderDataModule, center_crop_arr, stratified_split

# ---- digits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(image_size=16, channels=3, batch_size=64)
    dm.setup("fit")
    return dm


def test_digits_batches(digits):
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # gray as RGB
    assert digits.num_classes == 10 and set(labels.tolist()) <= set(range(10))


def test_digits_full_range_and_gray():
    dm = DigitsDataModule(image_size=8, channels=1)
    images, labels = dm.real_images("all")
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1  # 0 -> -1 and 16 -> 1 at the native size
    assert torch.equal(torch.unique(labels), torch.arange(10))


def test_digits_split_sizes_disjoint_stratified(digits):
    train_x, train_y = digits.real_images("train")
    val_x, val_y = digits.real_images("val")
    assert len(train_y) + len(val_y) == 1797
    assert abs(len(val_y) - 0.1 * 1797) <= 10
    assert set(digits.train_idx.tolist()).isdisjoint(digits.val_idx.tolist())
    counts_all = torch.bincount(digits.labels, minlength=10).float()
    counts_val = torch.bincount(val_y, minlength=10).float()
    assert torch.all((counts_val - 0.1 * counts_all).abs() <= 1)  # every class held out in proportion
    assert len(digits.val_dataloader().dataset) == len(val_y)
    assert len(digits.train_dataloader()) == len(train_y) // 64  # drop_last


def test_digits_split_deterministic(digits):
    again = DigitsDataModule(image_size=16)
    again.setup()
    assert torch.equal(again.val_idx, digits.val_idx)
    other = DigitsDataModule(image_size=16, split_seed=1)
    other.setup()
    assert not torch.equal(other.val_idx, digits.val_idx)
    # the order of the train loader is fixed by split_seed too
    first = [y for _, y in again.train_dataloader()]
    second = [y for _, y in again.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_digits_val_not_shuffled_and_small_train_kept(digits):
    val_labels = torch.cat([y for _, y in digits.val_dataloader()])
    assert torch.equal(val_labels, digits.real_images("val")[1])
    big = DigitsDataModule(image_size=8, batch_size=4096, val_fraction=0.5)
    assert sum(len(y) for _, y in big.train_dataloader()) == len(big.real_images("train")[1])


def test_digits_shift_augmentation():
    dm = DigitsDataModule(image_size=16, augment_shift=2, batch_size=32)
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(np.zeros(10), 1.0, 0)


# ---- image folder -------------------------------------------------------------------------------


def _jpeg_bytes(size, color):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def image_root(tmp_path):
    """2 classes, 5 good images (PNG, JPEG, odd sizes and modes), 1 random-bytes and 1 truncated JPEG."""
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "train" / "cat" / "a.png")
    Image.new("L", (20, 50), 128).save(tmp_path / "train" / "cat" / "b.PNG")
    (tmp_path / "train" / "cat" / "c.JPEG").write_bytes(_jpeg_bytes((64, 48), "blue"))
    (tmp_path / "train" / "dog" / "d.jpg").write_bytes(_jpeg_bytes((33, 33), "green"))
    Image.new("RGBA", (24, 24), (1, 2, 3, 4)).save(tmp_path / "train" / "dog" / "e.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / "corrupt.JPEG").write_bytes(np.random.default_rng(0).bytes(2000))
    full = _jpeg_bytes((256, 256), "white")
    (tmp_path / "train" / "cat" / "truncated.JPEG").write_bytes(full[: len(full) // 2])
    return tmp_path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_skips_unreadable(image_root, num_workers):
    # batch 8 > 7 files: no drop_last, so one epoch sees every file
    dm = ImageFolderDataModule(image_root, image_size=16, batch_size=8, num_workers=num_workers, val_fraction=0.0)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_samples) == 7  # the .txt is not an image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.train_dataloader())
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert len(batches) == 1 and images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert dm.skipped == 2
    messages = [str(w.message) for w in caught if "unreadable image" in str(w.message)]
    assert len(messages) == 2 and any("corrupt.JPEG" in m for m in messages)
    assert any("truncated.JPEG" in m for m in messages)
    # a second epoch counts the skips again but does not warn again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(dm.train_dataloader())
    assert dm.skipped == 4 and not [w for w in caught if "unreadable image" in str(w.message)]


def test_image_folder_val_folder_and_held_out(image_root):
    held_out = ImageFolderDataModule(image_root, image_size=8, val_fraction=0.5)
    held_out.setup()
    paths = {p for p, _ in held_out.train_samples} | {p for p, _ in held_out.val_samples}
    assert len(paths) == 7 and len(held_out.val_samples) >= 2  # disjoint, both classes held out
    again = ImageFolderDataModule(image_root, image_size=8, val_fraction=0.5)
    again.setup()
    assert again.val_samples == held_out.val_samples

    (image_root / "val" / "dog").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(image_root / "val" / "dog" / "v.webp")
    with_val = ImageFolderDataModule(image_root, image_size=8, batch_size=2, num_workers=0)
    with_val.setup()
    assert len(with_val.train_samples) == 7 and len(with_val.val_samples) == 1
    images, labels = next(iter(with_val.val_dataloader()))
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [1]


def test_center_crop_arr():
    wide = Image.new("RGB", (300, 100))
    assert center_crop_arr(wide, 64).size == (64, 64)
    tall = Image.new("RGB", (50, 1000))
    assert center_crop_arr(tall, 32).size == (32, 32)
    # the crop keeps the middle of the long side
    stripes = np.zeros((10, 30, 3), np.uint8)
    stripes[:, 10:20] = 255
    out = np.asarray(center_crop_arr(Image.fromarray(stripes), 10))
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_missing_root_names_path(tmp_path):
    missing = tmp_path / "no_such_imagenet"
    with pytest.raises(FileNotFoundError, match="no_such_imagenet"):
        ImageFolderDataModule(missing).setup()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="class folders"):
        ImageFolderDataModule(tmp_path / "empty").setup()
    (tmp_path / "empty" / "train" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="cls"):
        ImageFolderDataModule(tmp_path / "empty").setup()
