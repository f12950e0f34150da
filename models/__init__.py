"""Tokenizer models (``vqlib.models``): image / audio encoders-decoders around any vqlib quantizer."""

from .hub import HubMixin
from .image_tokenizer import ImageTokenizer, ImageTokenizerOutput

__all__ = ["HubMixin", "ImageTokenizer", "ImageTokenizerOutput"]
