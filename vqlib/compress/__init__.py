"""Post-training vector quantization of model weights.

    cfg = VQConfig(algorithm="calibrated", vector_dim=4, codebook_bits=8)
    model, report = vqlib.compress(model, cfg, calibration=batches)
    save_compressed(model, "out/")
    model = load_compressed("out/", skeleton_or_factory)

``vqlib.compress`` (after ``import vqlib``) is the function :func:`compress`, the entry point users
call. This package keeps its import path for everything else: ``from vqlib.compress import VQConfig,
compress, save_compressed, load_compressed`` and ``from vqlib.compress.format import VQLinear`` work,
but the attribute ``vqlib.compress`` is the function, so ``vqlib.compress.VQConfig`` and
``import vqlib.compress.io as m`` do not: import names with ``from vqlib.compress[.module] import ...``.
The storage format is documented in ``vqlib.compress.format``; the algorithms are registered in
``vqlib.compress.algorithms``.
"""

from . import hf_integration
from .api import compress
from .config import VQConfig
from .end_to_end import EndToEndConfig, EndToEndReport, finetune_end_to_end
from .format import FORMAT_VERSION, VQLinear
from .io import load_compressed, push_to_hub, save_compressed
from .report import CompressionReport, LayerReport
from .scalar import ScalarLinear

__all__ = [
    "FORMAT_VERSION",
    "CompressionReport",
    "EndToEndConfig",
    "EndToEndReport",
    "LayerReport",
    "ScalarLinear",
    "VQConfig",
    "VQLinear",
    "compress",
    "finetune_end_to_end",
    "load_compressed",
    "push_to_hub",
    "save_compressed",
]


hf_integration.install()  # transformers' from_pretrained loads vqlib folders; never imports transformers here
