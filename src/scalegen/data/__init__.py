"""LightningDataModules: the built-in digits and ImageNet-layout image folders."""

from .digits import DigitsDataModule, stratified_split
from .imagefolder import ImageFolderDataModule, center_crop_arr

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "center_crop_arr", "stratified_split"]
