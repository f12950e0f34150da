"""Compression algorithms by name: ``VQConfig(algorithm=...)`` is looked up here.

``compress`` never branches on an algorithm's name (as torchao's ``quantize_``): it asks the
registered :class:`Algorithm` whether it needs calibration batches, whether a layer fits its format,
and for the module that replaces one ``nn.Linear``. Adding an algorithm is a module that calls
``register_algorithm(Algorithm(...))`` and is imported before the ``VQConfig`` naming it is built;
the three built-in ones are registered below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .calibrated import gptq_vq
from .calibration import LayerStats
from .codebooks import VQParts
from .config import VQConfig
from .data_free import quantize_data_free
from .format import VQLinear, num_groups
from .scalar import ScalarLinear

# quantize(linear, weight, stats, cfg, seed) -> the module replacing ``linear``. ``weight`` is the
# layer's float32 weight (out, in) on the compute device; ``stats`` holds its calibration statistics
# (None without calibration, or for a layer the calibration batches do not reach).
QuantizeFn = Callable[[nn.Linear, Tensor, "LayerStats | None", VQConfig, int], nn.Module]
# format_reason(linear, cfg) -> (why the layer cannot take the format or None, a note for the report);
# raises for a config that can never work (pad="error").
FormatReasonFn = Callable[[nn.Linear, VQConfig], "tuple[str | None, str]"]


@dataclass(frozen=True)
class Algorithm:
    """One compression algorithm, as ``compress`` sees it.

    ``needs_calibration``: ``compress`` refuses to run it without calibration batches, and layers the
    batches never reach are left uncompressed (reported) instead of quantized without statistics.
    ``vector_format``: it writes ``VQLinear`` layers in the config's vector format, so a bit budget
    (``target_bits_per_weight``) can choose a format per layer.
    """

    name: str
    quantize: QuantizeFn
    format_reason: FormatReasonFn
    needs_calibration: bool = False
    vector_format: bool = True
    summary: str = ""


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Make ``algorithm`` selectable as ``VQConfig(algorithm=algorithm.name)``; returns it."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register_algorithm: expected an Algorithm, got {type(algorithm).__name__}")
    if algorithm.name in _REGISTRY and not replace:
        raise ValueError(
            f"register_algorithm: an algorithm named {algorithm.name!r} is already registered (pass replace=True)"
        )
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def algorithm_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_REGISTRY)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; a ValueError lists the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compression algorithm {name!r}; registered: {list(_REGISTRY)}") from None


def vq_format_reason(linear: nn.Linear, cfg: VQConfig) -> tuple[str | None, str]:
    """Whether a layer fits the vector format: divisible (or padded) input columns and enough
    vectors in every codebook group for the codebook's entries."""
    out_features, in_features = linear.weight.shape
    note = ""
    d = cfg.vector_dim
    if in_features % d:
        if cfg.pad == "error":
            raise ValueError(
                f"in_features={in_features} is not divisible by vector_dim={d} (set pad='pad' to zero-pad "
                f"or pad='skip' to leave such layers uncompressed)"
            )
        if cfg.pad == "skip":
            return f"in_features={in_features} not divisible by vector_dim={d} (pad='skip')", ""
        note = f"padded {in_features}->{math.ceil(in_features / d) * d} input columns"
    n_vec = math.ceil(in_features / d)
    per_group = n_vec if cfg.group_size is None else cfg.group_size // d
    last = n_vec - (num_groups(n_vec * d, cfg.group_size) - 1) * per_group
    fewest = out_features * min(per_group, last)
    if fewest < cfg.codebook_size:
        return (
            f"a codebook group has only {fewest} vectors for {cfg.codebook_size} codebook entries "
            f"(codebook_bits={cfg.codebook_bits}); use smaller codebook_bits, vector_dim or larger group_size"
        ), note
    return None, note


def vq_linear(linear: nn.Linear, parts: VQParts, cfg: VQConfig) -> VQLinear:
    """The ``VQLinear`` holding a VQ algorithm's result in the config's format."""
    return VQLinear.from_parts(
        linear,
        codes=parts.codes,
        codebook_values=parts.codebooks,
        codebook_scales=parts.codebook_scales,
        scales=parts.scales,
        vector_dim=cfg.vector_dim,
        codebook_bits=cfg.codebook_bits,
        group_size=cfg.group_size,
        codebook_dtype=cfg.codebook_dtype,
        scale_granularity=cfg.scale_granularity,
        scale_group_size=cfg.scale_group_size,
    )


def _data_free(linear: nn.Linear, weight: Tensor, stats: LayerStats | None, cfg: VQConfig, seed: int) -> nn.Module:
    return vq_linear(linear, quantize_data_free(weight, cfg, seed), cfg)


def _calibrated(linear: nn.Linear, weight: Tensor, stats: LayerStats | None, cfg: VQConfig, seed: int) -> nn.Module:
    if stats is None:
        raise RuntimeError("calibrated: no calibration statistics for this layer (this is a bug: please report it)")
    device = weight.device
    # cross is the original-input correlation; when it is the Hessian itself the target is W.
    cross = None if stats.cross is None or stats.cross is stats.hessian else stats.cross.to(device)
    wc = None if stats.cross_weight is None else stats.cross_weight.to(device)
    parts = gptq_vq(weight, stats.hessian.to(device), cfg, seed, cross=cross, weighted_cross=wc)
    return vq_linear(linear, parts, cfg)


def _scalar_rtn(linear: nn.Linear, weight: Tensor, stats: LayerStats | None, cfg: VQConfig, seed: int) -> nn.Module:
    return ScalarLinear.from_linear(linear, cfg.scalar_bits, cfg.scalar_group_size)


def _any_shape(linear: nn.Linear, cfg: VQConfig) -> tuple[str | None, str]:
    return None, ""  # a short last column group is padded: every shape fits


register_algorithm(
    Algorithm("data_free", _data_free, vq_format_reason, summary="k-means on the weights; no data needed")
)
register_algorithm(
    Algorithm(
        "calibrated",
        _calibrated,
        vq_format_reason,
        needs_calibration=True,
        summary="Hessian-aware GPTQ-style VQ with error feedback and codebook/scale fine-tuning",
    )
)
register_algorithm(
    Algorithm("scalar_rtn", _scalar_rtn, _any_shape, vector_format=False, summary="round-to-nearest scalar baseline")
)
