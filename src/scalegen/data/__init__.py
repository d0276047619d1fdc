"""LightningDataModules: the built-in digits and ImageNet-layout image folders."""

from scalegen.data.digits import DigitsDataModule, stratified_split
from scalegen.data.imagefolder import ImageFolderDataModule, center_crop_arr

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "center_crop_arr", "stratified_split"]
