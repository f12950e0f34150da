"""Load a module of numba loops once per process: compiled on first use (then from numba's cache),
or, when numba is missing or cannot compile them, one warning that names the slower path used instead."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import ModuleType

_loaded: dict[str, ModuleType | None] = {}


def load_loops(module: str, warm_up: Callable[[ModuleType], None], fallback: str) -> ModuleType | None:
    """``module`` imported and ``warm_up(module)`` run (so a compile error surfaces here), or None.

    ``fallback`` says what runs instead; it is in the one warning given when the loops fail."""
    if module not in _loaded:
        try:
            mod = importlib.import_module(module)
            warm_up(mod)
            _loaded[module] = mod
        except Exception as exc:  # numba missing or failing to compile: say so once, never silently
            _loaded[module] = None
            warnings.warn(
                f"{module}: the numba loops are unavailable ({type(exc).__name__}: {exc}); {fallback}",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[module]
