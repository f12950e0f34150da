"""Token layout shared by every quantizer: (..., d) or channel-first (b, d, *spatial) <-> (n, d)."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from ..validation import check_features, check_finite, check_mask


def to_tokens(x: Tensor, channel_first: bool) -> tuple[Tensor, tuple[int, ...]]:
    """(..., d) or (b, d, *spatial) -> ((n, d), token shape)."""
    if channel_first:
        x = rearrange(x, "b d ... -> b ... d")
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1])


def from_tokens(x: Tensor, token_shape: tuple[int, ...], channel_first: bool) -> Tensor:
    """Inverse of :func:`to_tokens`: (n, d) -> (*token_shape, d), or (b, d, *spatial) if channel_first."""
    x = x.reshape(*token_shape, x.shape[-1])
    return rearrange(x, "b ... d -> b d ...") if channel_first else x


def prepare_input(
    x: Tensor, mask: Tensor | None, dim: int, channel_first: bool, finite: bool
) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """Validate x and mask, flatten to tokens: ((n, dim), (n,) bool mask or None, token shape)."""
    check_features(x, dim, channel_first=channel_first)
    if finite:
        check_finite(x)
    tokens, token_shape = to_tokens(x, channel_first)
    check_mask(mask, token_shape)
    return tokens, (None if mask is None else mask.reshape(-1)), token_shape


def check_decode_layout(indices: Tensor, channel_first: bool, name: str) -> None:
    if channel_first and indices.ndim < 1:
        raise ValueError(
            f"{name}.decode: channel_first=True expects indices of shape (batch, *spatial), got a 0-d tensor"
        )
