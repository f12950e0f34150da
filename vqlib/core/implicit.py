"""Shared by the quantizers whose codebook is implicit (FSQ, LFQ): codes are computed from indices per token,
so decoding is the same three steps for both."""

from __future__ import annotations

from torch import Tensor, nn

from ..base import Quantizer
from .layout import check_decode_layout, from_tokens


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply an optional Linear projection (Identity passes through), casting x to the layer's dtype
    so that e.g. float64 inputs work with float32 weights (autocast still picks the compute dtype)."""
    if isinstance(layer, nn.Linear):
        return layer(x.to(layer.weight.dtype))
    return x


class ImplicitCodebookQuantizer(Quantizer):
    """Subclasses set ``codebook_dim``, ``project_out`` and ``channel_first`` and implement
    ``indices_to_codes(indices) -> (*indices.shape, codebook_dim)`` (the single place codes are built)."""

    codebook_dim: int
    project_out: nn.Module

    def indices_to_codes(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:
        """Quantized features for ``indices``; equal (torch.equal) to ``forward(x).quantized`` in eval mode
        for float32 inputs. Shape ``(*indices.shape, dim)``, or ``(b, dim, *spatial)`` when channel_first."""
        codes = self.indices_to_codes(indices)
        check_decode_layout(indices, self.channel_first, type(self).__name__)
        flat = codes.reshape(-1, self.codebook_dim)  # (tokens, codebook_dim)
        return from_tokens(project(self.project_out, flat), tuple(indices.shape), self.channel_first)
