"""transformers' config and quantizer classes for vqlib folders (``quant_method: "vqlib"``).

Imported only by ``vqlib.compress.hf_integration.register()``, since it imports transformers.
``AutoModelForCausalLM.from_pretrained(folder)`` on a folder written by ``save_compressed`` then:
builds the model on the meta device, lets ``VQLibHfQuantizer`` swap every layer named in
``quantization_config.modules`` for an empty ``VQLinear`` / ``ScalarLinear`` (the same code as
``load_compressed``), and loads ``model.safetensors`` into them by name. Tensors keep the dtypes of
the empty layers (fp16 codebooks stay fp16), so the result computes exactly what
``load_compressed`` returns.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import FORMAT_VERSION
from .io import _LAYER_TYPES, replace_with_compressed_layers

QUANT_METHOD = "vqlib"


class VQLibQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a vqlib folder (see ``vqlib.compress.io``), as transformers holds it.

    Only for loading: a vqlib model is compressed with ``vqlib.compress``, not at load time.
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        vqlib_version: str | None = None,
        files: dict[str, Any] | None = None,
        compress_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.vqlib_version = vqlib_version
        self.modules = modules if modules is not None else {}
        self.files = files if files is not None else {}
        if compress_config is not None:
            self.compress_config = compress_config
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():  # fields of newer writers are kept, so to_dict round-trips
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        version = self.format_version
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"vqlib quantization_config: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"vqlib quantization_config: format version {version} is newer than the version this vqlib reads "
                f"({FORMAT_VERSION}); upgrade vqlib (saved by vqlib {self.vqlib_version or '?'})"
            )
        if not isinstance(self.modules, dict) or not self.modules:
            raise ValueError(
                "vqlib quantization_config: 'modules' must be a non-empty mapping of module name -> layer spec"
            )
        for name, spec in self.modules.items():
            if not isinstance(spec, dict) or spec.get("layer_type") not in _LAYER_TYPES:
                raise ValueError(
                    f"vqlib quantization_config: module {name!r} has layer_type "
                    f"{spec.get('layer_type') if isinstance(spec, dict) else spec!r}, expected one of {sorted(_LAYER_TYPES)}"
                )


class VQLibHfQuantizer(HfQuantizer):
    """Loads pre-compressed vqlib weights into a transformers model (no compression at load time)."""

    requires_calibration = True  # transformers then refuses to "quantize" an uncompressed checkpoint with it

    def _process_model_before_weight_loading(self, model, **kwargs):
        _, built = replace_with_compressed_layers(model, self.quantization_config.modules, caller="from_pretrained")
        _drop_ties_into(model, set(built))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, **kwargs) -> bool:
        # save_pretrained would write a folder without vqlib's file checksums: save with vqlib.save_compressed.
        return False


def _drop_ties_into(model, replaced: set[str]) -> None:
    """Forget weight ties whose end is a replaced layer: its weight no longer exists (the saved config
    says ``tie_word_embeddings: false`` then; this also covers a folder written before that rule)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return

    def hits(key: str) -> bool:
        return key.rpartition(".")[0] in replaced

    model.all_tied_weights_keys = {t: s for t, s in tied.items() if not (hits(t) or hits(s))}
