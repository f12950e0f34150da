"""vqlib: vector quantization layers, tokenizers and post-training weight VQ."""

from . import compress  # callable package: vqlib.compress(model, cfg, calibration=...)
from .base import Quantizer, quantizer_from_config, quantizer_to_config
from .compress import VQConfig, VQLinear, load_compressed, save_compressed
from .fsq import FSQ
from .lfq import LFQ
from .output import QuantizerOutput
from .residual import ResidualVQ
from .vector_quantize import VectorQuantize

__version__ = "0.1.0"

__all__ = [
    "FSQ",
    "LFQ",
    "Quantizer",
    "QuantizerOutput",
    "ResidualVQ",
    "VQConfig",
    "VQLinear",
    "VectorQuantize",
    "compress",
    "load_compressed",
    "quantizer_from_config",
    "quantizer_to_config",
    "save_compressed",
]
