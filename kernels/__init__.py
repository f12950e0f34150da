"""Kernels for vqlib's compressed layers, and the one place that decides which of them runs.

A compressed layer (``VQLinear``, ``ScalarLinear``) calls ``vqlib.kernels.linear(layer, x)`` in its
forward. The registry holds ``Kernel`` entries keyed by layer type and device type; for each call
it picks the highest-priority kernel whose ``supports(layer, x)`` answers ``None`` (or the reason
it cannot run), and otherwise runs the layer's pure-PyTorch reference (dequantize + ``F.linear``),
which is also the ground truth every kernel is tested against.

Dispatch is visible, never silent:
- ``explain(layer, x)`` returns the ``Decision`` (kernel name or "reference", and why);
- the first call of each (layer type, device, format, path) logs one line on the ``vqlib.kernels``
  logger, and a fallback to the reference while a kernel exists for that device warns once;
- a kernel that fails to build raises ``KernelBuildError`` from ``run``: it is disabled for the
  rest of the process with one loud warning naming the fallback.

``VQLINEAR_KERNELS`` (environment, read at each dispatch) switches the choice: ``auto`` (default),
``reference`` (always the reference path, for debugging), or a comma-separated list of kernel
names that may run (others are treated as unavailable, with that reason).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

logger = logging.getLogger("vqlib.kernels")

ENV_SWITCH = "VQLINEAR_KERNELS"
REFERENCE = "reference"


class KernelBuildError(RuntimeError):
    """Raised by a kernel's ``run`` when its compiled code cannot be built or loaded on this machine."""


@dataclass(frozen=True)
class Kernel:
    """One compiled implementation of a compressed layer's forward.

    ``supports(layer, x)`` returns None when the kernel can run this layer on this input, otherwise a
    short reason ("codebook_bits=16 not covered", "batch 64 above the small-batch crossover", ...).
    ``run(layer, x)`` returns what the layer's reference forward returns, up to float rounding.
    """

    name: str
    layer_type: str
    device_type: str
    run: Callable[[nn.Module, Tensor], Tensor]
    supports: Callable[[nn.Module, Tensor], str | None]
    priority: int = 0
    # Why this kernel, once it takes a call (for explain and the log line); default "format and input supported".
    describe: Callable[[nn.Module, Tensor], str] | None = field(default=None, compare=False)
    # ``bind(layer, x)`` -> a ``run`` with this call's constants resolved (the Triton kernels' measured tile plan),
    # kept with the memoized decision so that decoding does not look them up again on every token.
    bind: Callable[[nn.Module, Tensor], Callable[[nn.Module, Tensor], Tensor]] | None = field(
        default=None, compare=False
    )


@dataclass(frozen=True)
class Decision:
    path: str  # a kernel name, or "reference"
    reason: str
    kernel: Kernel | None = field(default=None, compare=False, repr=False)
    run: Callable[[nn.Module, Tensor], Tensor] | None = field(
        default=None, compare=False, repr=False
    )  # kernel's, bound
    # True when a kernel for this device could not take the call: a slow path the user should hear about.
    # False for deliberate choices (the switch, a cached dense weight, autograd) and for a kernel.
    fallback: bool = False


_KERNELS: list[Kernel] = []
_BROKEN: dict[str, str] = {}  # kernel name -> what failed ("failed to build (...)")
_LOGGED: set[tuple] = set()
_MEMO_SIZE = 16  # decisions remembered per layer (see _decide)


def register_kernel(kernel: Kernel) -> None:
    """Add ``kernel`` (replacing one of the same name)."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"register_kernel: expected a vqlib.kernels.Kernel, got {type(kernel).__name__}")
    unregister_kernel(kernel.name)
    _KERNELS.append(kernel)
    _KERNELS.sort(key=lambda k: -k.priority)


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]
    _BROKEN.pop(name, None)


def registered_kernels(layer_type: str | None = None, device_type: str | None = None) -> list[Kernel]:
    return [
        k
        for k in _KERNELS
        if (layer_type is None or k.layer_type == layer_type) and (device_type is None or k.device_type == device_type)
    ]


def _env_choice() -> tuple[str, set[str] | None]:
    """("auto" | "reference" | "list", allowed names or None)."""
    raw = os.environ.get(ENV_SWITCH, "auto").strip()
    if raw in ("", "auto"):
        return "auto", None
    if raw == REFERENCE:
        return REFERENCE, None
    return "list", {name.strip() for name in raw.split(",") if name.strip()}


def _deliberate_reference(layer: nn.Module, x: Tensor) -> str | None:
    """Why the reference path is the right one for this call, whatever kernels exist (None: ask the kernels)."""
    if _env_choice()[0] == REFERENCE:
        return f"{ENV_SWITCH}=reference forces the reference path"
    if getattr(layer, "weight_cache", None) is not None:
        return "the layer holds a dequantized weight cache (cache_dequantized_weight): F.linear on it"
    if _grad_needed(layer, x):
        return "gradients are needed and the kernels have no backward; the reference path is differentiable"
    return None


def explain(layer: nn.Module, x: Tensor) -> Decision:
    """Which path ``layer(x)`` takes and why (does not run anything)."""
    deliberate = _deliberate_reference(layer, x)
    if deliberate is not None:
        return Decision(REFERENCE, deliberate)
    _, allowed = _env_choice()
    candidates = registered_kernels(type(layer).__name__, x.device.type)
    if not candidates:
        return Decision(REFERENCE, f"no {type(layer).__name__} kernel is registered for device type {x.device.type!r}")
    reasons = []
    for kernel in candidates:
        if allowed is not None and kernel.name not in allowed:
            reasons.append(f"{kernel.name}: not listed in {ENV_SWITCH}")
            continue
        if kernel.name in _BROKEN:
            reasons.append(f"{kernel.name}: {_BROKEN[kernel.name]}")
            continue
        why_not = kernel.supports(layer, x)
        if why_not is None:
            # Say why the faster (higher-priority) kernels declined, so the choice is explained.
            why = kernel.describe(layer, x) if kernel.describe is not None else "format and input supported"
            run = kernel.bind(layer, x) if kernel.bind is not None else kernel.run
            return Decision(kernel.name, "; ".join([*reasons, f"{kernel.name}: {why}"]), kernel, run)
        reasons.append(f"{kernel.name}: {why_not}")
    return Decision(REFERENCE, "; ".join(reasons), fallback=True)


def _format_key(layer: nn.Module) -> tuple:
    # Memoized on the layer (a layer's format never changes): this runs on every forward call.
    key = layer.__dict__.get("_kernels_format_key")
    if key is None:
        spec = layer.format_spec() if hasattr(layer, "format_spec") else {}
        key = tuple(sorted((k, v) for k, v in spec.items() if k not in ("in_features", "out_features", "bias")))
        layer.__dict__["_kernels_format_key"] = key
    return key


def _log_once(layer: nn.Module, x: Tensor, decision: Decision) -> None:
    # One line per layer format and path (not per reason: reasons may name the batch size).
    key = (type(layer).__name__, str(x.device), x.dtype, _format_key(layer), decision.path)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    message = (
        f"{type(layer).__name__} on {x.device} ({x.dtype}, {layer.extra_repr()}): {decision.path} ({decision.reason})"
    )
    if decision.fallback:
        warnings.warn(
            f"vqlib.kernels: falling back to the slow reference path: {message}", RuntimeWarning, stacklevel=4
        )
    logger.info(message)


def _grad_needed(layer: nn.Module, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))


def _memo_key(layer: nn.Module, x: Tensor) -> tuple:
    """Everything ``explain`` reads that can change between two calls on the same layer.

    The registry's state enters by identity and size (tests swap the containers); the layer's format is
    fixed, but its buffers may move to another device.
    """
    return (
        x.dtype,
        x.device,
        x.shape,
        os.environ.get(ENV_SWITCH, "auto"),
        _grad_needed(layer, x),
        getattr(layer, "weight_cache", None) is not None,
        layer._buffers["codes"].device if "codes" in layer._buffers else None,
        id(_KERNELS),
        len(_KERNELS),
        id(_BROKEN),
        len(_BROKEN),
    )


def _decide(layer: nn.Module, x: Tensor) -> Decision:
    """``explain``, memoized per layer and input signature: decoding calls every layer once per token with
    the same shapes, and the full explanation (format checks, reasons) costs more than a small kernel call."""
    if torch.compiler.is_compiling():  # dynamo traces this: no memo mutation, no logging (the eager call logged)
        return explain(layer, x)
    memo = layer.__dict__.setdefault("_kernels_decisions", {})
    key = _memo_key(layer, x)
    decision = memo.get(key)
    if decision is None:
        decision = explain(layer, x)
        _log_once(layer, x, decision)
        if len(memo) >= _MEMO_SIZE:  # prefill lengths vary: keep the memo bounded
            memo.clear()
        memo[key] = decision
    return decision


def linear(layer: nn.Module, x: Tensor) -> Tensor:
    """Run ``layer``'s forward on ``x`` through the chosen kernel or the layer's reference path."""
    while True:
        decision = _decide(layer, x)
        if decision.kernel is None:
            return layer._reference_linear(x)
        try:
            return decision.run(layer, x)
        except KernelBuildError as exc:
            mark_broken(decision.kernel.name, exc)  # changes every memo key: the next loop re-decides


def mark_broken(name: str, exc: BaseException, failure: str = "failed to build") -> None:
    """Disable kernel ``name`` for the rest of the process, with one loud warning naming the fallback."""
    _BROKEN[name] = f"{failure} ({exc})"
    warnings.warn(
        f"vqlib.kernels: kernel {name!r} {failure} and is disabled for this process "
        f"({exc}); falling back to the next kernel or the reference path",
        RuntimeWarning,
        stacklevel=3,
    )


def kernel_name_usable(name: str) -> bool:
    """Whether kernel ``name`` may be chosen now: registered, not broken, allowed by VQLINEAR_KERNELS."""
    mode, allowed = _env_choice()
    if mode == REFERENCE or name in _BROKEN or (allowed is not None and name not in allowed):
        return False
    return any(k.name == name for k in _KERNELS)


def reset_dispatch_log() -> None:
    """Forget which dispatch lines were already logged and which kernels failed (tests use this)."""
    _LOGGED.clear()
    _BROKEN.clear()


def _register_builtin_kernels() -> None:
    """Import the kernel modules that register themselves; each guards its own optional dependency."""
    from . import (  # noqa: F401  (CPU: numba is imported on first run; its absence fails loudly there)
        cpu_lut,
        cpu_lut_avx512,
        cpu_scalar,
        triton_vq,  # noqa: F401  (CUDA: registers only when triton and a GPU are present)
    )


_register_builtin_kernels()

from .triton_fused import FusedVQLinear, fuse_projections  # noqa: E402  (pure torch; needs the registry above)

__all__ = [
    "ENV_SWITCH",
    "Decision",
    "FusedVQLinear",
    "Kernel",
    "KernelBuildError",
    "explain",
    "fuse_projections",
    "linear",
    "register_kernel",
    "registered_kernels",
    "reset_dispatch_log",
    "unregister_kernel",
]
