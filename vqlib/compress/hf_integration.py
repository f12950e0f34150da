"""Makes ``transformers.AutoModel*.from_pretrained(folder)`` load folders written by ``save_compressed``.

``import vqlib`` calls ``install()``: if transformers' quantizer registry
(``transformers.quantizers.auto``) is already imported, vqlib's config and quantizer are
registered at once with transformers' public hooks (``register_quantization_config`` /
``register_quantizer``) under ``quant_method: "vqlib"``; otherwise a one-shot import hook
registers them right after transformers imports that module. So ``import vqlib`` never imports
transformers (it is an optional dependency and slow to import), and the order of
``import vqlib`` and ``import transformers`` does not matter. ``register()`` does it by hand.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings

_REGISTRY_MODULE = "transformers.quantizers.auto"


def register() -> None:
    """Register vqlib with transformers now (imports transformers). Idempotent."""
    from transformers.quantizers import auto

    from .hf_quantizer import QUANT_METHOD, VQLibHfQuantizer, VQLibQuantizationConfig

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not VQLibQuantizationConfig:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a stale class from a reloaded vqlib
        auto.register_quantization_config(QUANT_METHOD)(VQLibQuantizationConfig)
    if auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not VQLibHfQuantizer:
        auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantizer(QUANT_METHOD)(VQLibHfQuantizer)


def _register_after_import() -> None:
    try:
        register()
    except Exception as exc:  # never break the user's `import transformers` because of vqlib
        warnings.warn(
            f"vqlib: could not register quant_method 'vqlib' with transformers ({type(exc).__name__}: {exc}); "
            "AutoModel*.from_pretrained will not load vqlib folders (vqlib.load_compressed still does)",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the normal loader of transformers' quantizer registry so that
    vqlib registers itself as soon as that module has finished executing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _uninstall_hook()
            _register_after_import()

        spec.loader.exec_module = exec_module
        return spec


_HOOK = _RegisterOnImport()


def _uninstall_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now if transformers' registry is loaded, else when it gets imported (called by ``import vqlib``)."""
    if _REGISTRY_MODULE in sys.modules:
        _register_after_import()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
