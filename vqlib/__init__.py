"""vqlib: vector quantization layers, tokenizers and post-training weight VQ."""

from .base import Quantizer, quantizer_from_config, quantizer_to_config
from .output import QuantizerOutput

__version__ = "0.1.0"

__all__ = ["Quantizer", "QuantizerOutput", "quantizer_from_config", "quantizer_to_config"]
