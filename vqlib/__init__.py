"""vqlib: vector quantization layers, tokenizers and post-training weight VQ."""

from .fsq import FSQ
from .lfq import LFQ
from .base import Quantizer, quantizer_from_config, quantizer_to_config
from .output import QuantizerOutput
from .residual import ResidualVQ
from .vector_quantize import VectorQuantize
from . import compress  # callable package: vqlib.compress(model, cfg, calibration=...)
from .compress import VQConfig, VQLinear, load_compressed, save_compressed

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
