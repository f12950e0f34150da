"""Tokenizer models (``vqlib.models``): image / audio encoders-decoders around any vqlib quantizer."""

from .frozen_codebook import frozen_codebook_quantizer
from .hub import HubMixin
from .image_tokenizer import ImageTokenizer, ImageTokenizerOutput

__all__ = ["HubMixin", "ImageTokenizer", "ImageTokenizerOutput", "frozen_codebook_quantizer"]

# Audio tokenizer (EnCodec-style codec).
from .audio_tokenizer import AudioTokenizer, AudioTokenizerOutput  # noqa: E402

__all__ += ["AudioTokenizer", "AudioTokenizerOutput"]
