"""LightningDataModules."""

from vaelab.data.dsprites import DSpritesDataModule
from vaelab.data.image_folder import ImageFolderDataModule
from vaelab.data.mnist import MNISTDataModule

__all__ = ["MNISTDataModule", "ImageFolderDataModule", "DSpritesDataModule"]
