"""vqlib: vector quantization layers, tokenizers and post-training weight VQ."""

from .fsq import FSQ
from .lfq import LFQ
from .base import Quantizer, quantizer_from_config, quantizer_to_config
from .output import QuantizerOutput
from .residual import ResidualVQ
from .vector_quantize import VectorQuantize

__version__ = "0.1.0"

__all__ = ["FSQ", "LFQ", "Quantizer", "QuantizerOutput", "ResidualVQ", "VectorQuantize", "quantizer_from_config", "quantizer_to_config"]
