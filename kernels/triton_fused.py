"""Fused projections: layers that read the same input (q/k/v, gate/up) as one kernel launch.

``FusedVQLinear([q, k, v])`` stacks the rows of ``VQLinear`` layers of one format (same
in_features, d, M, B, groups, codebook dtype, scale granularity): codes, scales and biases are
concatenated along the output rows, the codebooks of the layers are stacked (layer i's
codebook groups become groups ``i*G .. i*G+G-1``) and ``rowset`` (out,) int32 names each row's
layer, so the Triton kernels read the right codebooks per row. The concatenation is done once,
when the module is built; it holds one copy of the tensors (drop the original layers).

``forward(x)`` returns one output per layer (views of one (..., sum of outs) result) and goes
through ``vqlib.kernels.linear`` like ``VQLinear`` (kernels ``triton_vq_*_fused`` on CUDA, the
reference elsewhere). Model code must call the fused module itself, e.g.
``q, k, v = self.qkv(x)`` after ``fuse_projections(attn, ["q_proj", "k_proj", "v_proj"], "qkv")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqlib.compress.format import VQLinear, decode_weight, unpack_codes

_SAME = (
    "in_features",
    "vector_dim",
    "num_codebooks",
    "codebook_bits",
    "group_size",
    "codebook_dtype",
    "scale_granularity",
    "scale_group_size",
)


def _check_same_format(layers: Sequence[VQLinear]) -> None:
    if not layers or not all(isinstance(layer, VQLinear) for layer in layers):
        raise TypeError(
            f"FusedVQLinear: expected a non-empty list of VQLinear, got {[type(l).__name__ for l in layers]}"
        )
    first = layers[0].format_spec()
    for i, layer in enumerate(layers[1:], 1):
        spec = layer.format_spec()
        diff = {k: (first[k], spec[k]) for k in _SAME if first[k] != spec[k]}
        if diff:
            raise ValueError(f"FusedVQLinear: layer {i} differs from layer 0 in {diff} (expected one format)")
        if layer.codes.device != layers[0].codes.device:
            raise ValueError(
                f"FusedVQLinear: layer {i} is on {layer.codes.device}, layer 0 on {layers[0].codes.device}"
            )


class FusedVQLinear(nn.Module):
    """Several ``VQLinear`` of one format over the same input, computed by one launch."""

    def __init__(self, layers: Sequence[VQLinear]) -> None:
        super().__init__()
        _check_same_format(layers)
        first = layers[0]
        for name in _SAME + ("num_codebook_groups", "num_vectors"):
            setattr(self, name, getattr(first, name))
        self.splits = [layer.out_features for layer in layers]
        self.out_features = sum(self.splits)
        device = first.codes.device
        self.register_buffer("codes", torch.cat([l.codes for l in layers]))  # (out, n_vec, M)
        self.register_buffer("codebooks", torch.cat([l.codebooks for l in layers]))  # (L*G, M, K, d)
        cbs = None if first.codebook_scales is None else torch.cat([l.codebook_scales for l in layers])
        self.register_buffer("codebook_scales", cbs)  # (L*G, M) or None
        self.register_buffer("scales", None if first.scales is None else torch.cat([l.scales for l in layers]))
        self.register_buffer("bias", self._stacked_bias(layers))
        rowset = [torch.full((n,), i, dtype=torch.int32, device=device) for i, n in enumerate(self.splits)]
        self.register_buffer("rowset", torch.cat(rowset))  # (out,) layer of each row

    @staticmethod
    def _stacked_bias(layers: Sequence[VQLinear]) -> Tensor | None:
        biased = [l.bias for l in layers if l.bias is not None]
        if not biased:
            return None
        dtype = biased[0].dtype
        parts = [
            l.bias.detach().to(dtype)
            if l.bias is not None
            else torch.zeros(l.out_features, dtype=dtype, device=l.codes.device)
            for l in layers
        ]
        return torch.cat(parts)

    def format_spec(self) -> dict[str, Any]:
        return {"layer_type": "FusedVQLinear", "splits": tuple(self.splits), **{k: getattr(self, k) for k in _SAME}}

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(sum of outs, in_features) weight: each layer's rows decoded with its own codebooks."""
        g, parts, start = self.num_codebook_groups, [], 0
        cb = self.codebooks.float()
        if self.codebook_scales is not None:
            cb = cb * self.codebook_scales.float()[:, :, None, None]
        for i, n in enumerate(self.splits):
            rows = slice(start, start + n)
            scales = None if self.scales is None else self.scales[rows].float()
            parts.append(
                decode_weight(
                    unpack_codes(self.codes[rows]),
                    cb[i * g : (i + 1) * g],
                    scales,
                    vector_dim=self.vector_dim,
                    group_size=self.group_size,
                    scale_group_size=self.scale_group_size if self.scale_granularity == "group" else None,
                )
            )
            start += n
        return torch.cat(parts)[:, : self.in_features].to(dtype)

    def _reference_linear(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FusedVQLinear: expected {self.in_features} input features, got shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(torch.float32).to(x.dtype), bias)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        from vqlib import kernels

        return tuple(kernels.linear(self, x).split(self.splits, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, splits={self.splits}, d={self.vector_dim}, M={self.num_codebooks}, B={self.codebook_bits}"


def fuse_projections(
    parent: nn.Module, names: Sequence[str], fused_name: str, drop_originals: bool = True
) -> FusedVQLinear:
    """Attach ``parent.<fused_name> = FusedVQLinear([parent.<n> for n in names])`` (and delete the
    originals unless ``drop_originals=False``); the caller's forward then calls the fused module."""
    layers = [getattr(parent, name) for name in names]
    fused = FusedVQLinear(layers)
    setattr(parent, fused_name, fused)
    if drop_originals:
        for name in names:
            delattr(parent, name)
    return fused
