"""Input checks shared by every quantizer: clear errors naming expected vs got."""

from __future__ import annotations

from typing import Any, get_args

import torch
from torch import Tensor


def choices(literal_type: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` type (the single source of an option's choices)."""
    allowed = get_args(literal_type)
    if not allowed:
        raise TypeError(f"choices: expected a typing.Literal type, got {literal_type!r}")
    return allowed


def check_choice(name: str, value: Any, literal_type: Any) -> None:
    """Raise ``ValueError("<name> must be 'a', 'b' or 'c', got 'x'")`` unless ``value`` is one of the
    ``Literal`` type's values. Every string option of vqlib is checked here, so all say it the same way."""
    allowed = choices(literal_type)
    if value in allowed:
        return
    quoted = [repr(a) for a in allowed]
    text = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise ValueError(f"{name} must be {text}, got {value!r}")


def check_features(x: Tensor, dim: int, *, channel_first: bool = False, name: str = "input") -> None:
    """Check that ``x`` carries ``dim`` features on its feature axis and is floating point."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got dtype {x.dtype}")
    if channel_first:
        if x.ndim < 2:
            raise ValueError(
                f"{name}: channel_first=True expects shape (batch, {dim}, *spatial) with at least 2 dims, "
                f"got shape {tuple(x.shape)}"
            )
        got = x.shape[1]
        where = "dim 1"
    else:
        if x.ndim < 1:
            raise ValueError(f"{name}: expected shape (..., {dim}), got a 0-d tensor")
        got = x.shape[-1]
        where = "the last dim"
    if got != dim:
        raise ValueError(f"{name}: expected {dim} features on {where}, got {got} (shape {tuple(x.shape)})")


def check_finite(x: Tensor, name: str = "input") -> None:
    """Raise on NaN/Inf so that they never reach (and poison) a codebook."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(
            f"{name}: expected finite values, got {bad} NaN/Inf entries out of {x.numel()}; "
            "non-finite inputs are rejected so they cannot corrupt the codebook "
            "(pass check_finite=False to skip this check)"
        )


def check_indices(
    indices: Tensor, codebook_size: int, name: str = "indices", *, allow_negative_one: bool = False
) -> None:
    """Check that code indices are integers in ``[0, codebook_size)``."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of integer code indices, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {indices.dtype}")
    if indices.numel() == 0:
        return
    lo = -1 if allow_negative_one else 0
    mn, mx = int(indices.min()), int(indices.max())
    if mn < lo or mx >= codebook_size:
        raise IndexError(
            f"{name}: expected values in [{lo}, {codebook_size - 1}] for a codebook of {codebook_size} codes, "
            f"got min {mn} and max {mx}"
        )


def check_mask(mask: Tensor | None, expected_shape: tuple[int, ...], name: str = "mask") -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected a bool tensor (True = keep), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{name}: expected shape {tuple(expected_shape)}, got {tuple(mask.shape)}")
