"""Scalar round-to-nearest with group scales: the baseline, stored with honest bit packing.

Format of a ``ScalarLinear`` (version 1): per output row, the input columns are cut into groups of
``group_size`` (the last group may be shorter). Each group has an fp16 ``scales`` entry and a uint8
``zeros`` entry (asymmetric min-max grid that always contains 0, as in GPTQ), and every weight an
unsigned ``bits``-bit level ``q``: ``w = scale * (q - zero)``. ``qweight`` holds the levels of the
(out, in) matrix in row-major order, bit-packed little-endian (bit ``i`` of the stream is bit
``i % 8`` of byte ``i // 8``; level bits least significant first).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .format import DequantCacheMixin


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints < 2**bits into a uint8 bit stream (little-endian)."""
    flat = values.reshape(-1).long()
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 2 ** torch.arange(8, device=flat.device)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values as int64."""
    if packed.numel() * 8 < count * bits:
        raise ValueError(f"unpack_bits: {packed.numel()} bytes hold fewer than {count} values of {bits} bits")
    # uint8 bit planes keep the temporary at one byte per bit.
    stream = ((packed[:, None] >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    out = stream[:, 0].long()
    for b in range(1, bits):
        out |= stream[:, b].long() << b
    return out


def rtn_quantize(weight: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest of a float (out, in) weight -> (levels (out, in) int64, scales fp16, zeros uint8)."""
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group_size)
    w = weight.float()
    pad = n_groups * group_size - in_features
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    g = w.reshape(out_features, n_groups, group_size)
    maxq = 2**bits - 1
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -torch.ones_like(lo), lo)
    hi = torch.where(flat, torch.ones_like(hi), hi)
    # Round the scale to its stored fp16 value first so the levels are optimal for what is stored.
    scale = ((hi - lo) / maxq).to(torch.float16).float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, maxq)
    levels = q.reshape(out_features, -1)[:, :in_features].long()
    return levels, scale.to(torch.float16), zero.to(torch.uint8)


class ScalarLinear(DequantCacheMixin, nn.Module):
    """Linear layer with a scalar ``bits``-bit round-to-nearest weight and per-group scales/zeros."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int = 128,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"ScalarLinear: bits must be in [1, 8], got {bits}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.num_groups = math.ceil(in_features / group_size)
        count = out_features * in_features
        self.register_buffer("qweight", torch.zeros(math.ceil(count * bits / 8), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, self.num_groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, self.num_groups, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.bias = None
        self.register_buffer("weight_cache", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "ScalarLinear":
        w = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            bias_dtype=w.dtype,
            device=w.device,
        )
        q, scale, zero = rtn_quantize(w, bits, group_size)
        layer.qweight.copy_(pack_bits(q, bits))
        layer.scales.copy_(scale)
        layer.zeros.copy_(zero)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def format_spec(self) -> dict[str, Any]:
        return {
            "layer_type": "ScalarLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> "ScalarLinear":
        args = {k: v for k, v in spec.items() if k not in ("layer_type", "bias_dtype")}
        return cls(bias_dtype=getattr(torch, spec.get("bias_dtype") or "float32"), device=device, **args)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes() / (self.out_features * self.in_features)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = unpack_bits(self.qweight, self.bits, self.out_features * self.in_features)
        q = q.reshape(self.out_features, self.in_features)
        group = torch.arange(self.in_features, device=q.device) // self.group_size
        w = (q.float() - self.zeros.float()[:, group]) * self.scales.float()[:, group]
        return w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        from vqlib import kernels  # lazy: vqlib.kernels imports kernel modules that import this one

        return kernels.linear(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bits_per_weight={self.bits_per_weight:.3f}"
        )
