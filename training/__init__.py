"""Training (``vqlib.training``): LightningModules, DataModules and the ``vqlib-train`` CLI."""

from .image import ImageTokenizerModule
from .image_data import EmbeddedImageDataModule, ImageFolderDataModule

__all__ = ["EmbeddedImageDataModule", "ImageFolderDataModule", "ImageTokenizerModule"]
