"""vqlib: vector quantization layers, tokenizers and post-training weight VQ."""

from .base import Quantizer, quantizer_from_config, quantizer_to_config

# ``vqlib.compress`` is the function compress(model, cfg, calibration=...): binding it here replaces the
# package attribute the import just set. The package keeps its path for ``from vqlib.compress import ...``.
from .compress import VQConfig, VQLinear, compress, load_compressed, save_compressed
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
