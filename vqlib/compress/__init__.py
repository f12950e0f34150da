"""Post-training vector quantization of model weights (``import vqlib.compress``).

    cfg = VQConfig(algorithm="calibrated", vector_dim=4, codebook_bits=8)
    model, report = compress(model, cfg, calibration=batches)
    save_compressed(model, "out/")
    model = load_compressed("out/", skeleton_or_factory)

The storage format is documented in ``vqlib.compress.format``.
"""

import sys
import types

from . import hf_integration
from .api import compress
from .config import VQConfig
from .format import FORMAT_VERSION, VQLinear
from .io import load_compressed, push_to_hub, save_compressed
from .report import CompressionReport, LayerReport
from .scalar import ScalarLinear

__all__ = [
    "FORMAT_VERSION",
    "CompressionReport",
    "LayerReport",
    "ScalarLinear",
    "VQConfig",
    "VQLinear",
    "compress",
    "load_compressed",
    "push_to_hub",
    "save_compressed",
]


hf_integration.install()  # transformers' from_pretrained loads vqlib folders; never imports transformers here


class _CallableModule(types.ModuleType):
    """Lets ``vqlib.compress`` be both this package and the ``compress(model, cfg)`` entry point."""

    def __call__(self, model, config, **kwargs):
        return compress(model, config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
