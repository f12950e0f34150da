"""Training (``vqlib.training``): LightningModules, DataModules and the ``vqlib-train`` CLI."""

from .image import ImageTokenizerModule
from .image_data import EmbeddedImageDataModule, ImageFolderDataModule

__all__ = ["EmbeddedImageDataModule", "ImageFolderDataModule", "ImageTokenizerModule"]

# Audio tokenizer training.
from .audio import AudioTokenizerModule  # noqa: E402
from .audio_data import AudioFolderDataModule, SynthAudioDataModule  # noqa: E402

__all__ += ["AudioFolderDataModule", "AudioTokenizerModule", "SynthAudioDataModule"]
