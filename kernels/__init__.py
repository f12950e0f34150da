"""Registry of compiled kernels for vqlib's compressed layers.

Nothing is registered yet: every query answers False and ``VQLinear`` runs its pure-PyTorch
reference forward (dequantize + ``F.linear``). A kernel module registers itself with
``register_lookup_linear(device_type, fn, available=...)``; ``fn(x, layer)`` receives the input and
the ``vqlib.compress.VQLinear`` (whose tensors follow ``vqlib.compress.format``) and must return
exactly what ``layer``'s reference forward returns, up to floating-point rounding.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LookupLinear = Callable[[Tensor, "torch.nn.Module"], Tensor]

# device type ("cuda", ...) -> (kernel, availability check for a concrete device)
_LOOKUP_LINEAR: dict[str, tuple[LookupLinear, Callable[[torch.device], bool]]] = {}


def register_lookup_linear(
    device_type: str, fn: LookupLinear, available: Callable[[torch.device], bool] | None = None
) -> None:
    """Register ``fn`` as the VQLinear kernel for ``device_type``; ``available(device)`` may veto a device."""
    if not callable(fn):
        raise TypeError(f"register_lookup_linear: expected a callable kernel, got {type(fn).__name__}")
    _LOOKUP_LINEAR[device_type] = (fn, available or (lambda device: True))


def unregister_lookup_linear(device_type: str) -> None:
    _LOOKUP_LINEAR.pop(device_type, None)


def lookup_linear_available(device: torch.device | str) -> bool:
    """True when a registered kernel can run VQLinear on ``device`` (always False on CPU today)."""
    device = torch.device(device)
    entry = _LOOKUP_LINEAR.get(device.type)
    return entry is not None and bool(entry[1](device))


def lookup_linear(x: Tensor, layer: "torch.nn.Module") -> Tensor:
    entry = _LOOKUP_LINEAR.get(x.device.type)
    if entry is None or not entry[1](x.device):
        raise RuntimeError(
            f"lookup_linear: no VQLinear kernel is available for device {x.device}; "
            "check lookup_linear_available(device) first (VQLinear does)"
        )
    return entry[0](x, layer)


__all__ = ["lookup_linear", "lookup_linear_available", "register_lookup_linear", "unregister_lookup_linear"]
