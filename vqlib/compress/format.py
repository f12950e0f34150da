"""The vqlib compressed-linear format (version 1) and ``VQLinear``, its reference implementation.

This module is the one documented place for the format; kernels read it.

A linear weight ``W`` of shape (out, in) is cut into vectors of ``d`` consecutive input columns.
If ``in`` is not a multiple of ``d`` it is zero-padded on the right to ``in_padded = n_vec * d``
(``n_vec = ceil(in / d)``); the pad is dequantized like any column and dropped (``[:, :in]``)
before the matmul. Tensors of one ``VQLinear`` (state-dict names, relative to the module):

``codes``          (out, n_vec, M), uint8 when B <= 8; int16 when 9 <= B <= 16, holding the
                   uint16 code bit pattern (``code = int(codes) & 0xFFFF``).
``codebooks``      (G, M, K, d) with K = 2**B, fp16, or int8 when codebook_dtype == "int8".
                   G = ceil(in_padded / group_size) codebook groups (G = 1 per layer).
``codebook_scales``(G, M) fp16, only for int8 codebooks: entry value = int8 value * scale.
``scales``         (out, S) fp16, absent when scale_granularity == "none". S = 1 for "row",
                   ceil(in_padded / scale_group_size) for "group".
``bias``           (out,) in the model's dtype, when the original layer had one.

Vector ``j`` of row ``o`` (columns ``j*d .. j*d+d-1``) belongs to codebook group
``g = (j*d) // group_size`` (0 without groups) and scale group ``s = (j*d) // scale_group_size``
(0 for "row"); both sizes are multiples of ``d``. Its value is

    W_hat[o, j*d:(j+1)*d] = scales[o, s] * sum_m codebook(g, m)[codes[o, j, m]]

The format parameters are kept in the JSON ``quantization_config`` next to the safetensors file
(see ``vqlib.compress.io``). Bits per weight are counted from the stored tensors, with nothing
left out: 8 * (bytes of codes + codebooks + codebook_scales + scales) / (out * in).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT_VERSION = 1


def code_storage_dtype(codebook_bits: int) -> torch.dtype:
    if 1 <= codebook_bits <= 8:
        return torch.uint8
    if 9 <= codebook_bits <= 16:
        return torch.int16
    raise ValueError(f"codebook_bits: expected a value in [1, 16], got {codebook_bits}")


def pack_codes(codes: Tensor, codebook_bits: int) -> Tensor:
    """int64 codes in [0, 2**B) -> storage dtype (uint8, or int16 holding the uint16 bit pattern)."""
    k = 2**codebook_bits
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise IndexError(f"pack_codes: expected codes in [0, {k - 1}], got [{int(codes.min())}, {int(codes.max())}]")
    dtype = code_storage_dtype(codebook_bits)
    if dtype == torch.uint8:
        return codes.to(torch.uint8)
    return torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16)


def unpack_codes(codes: Tensor) -> Tensor:
    """Storage codes -> int64 codes."""
    if codes.dtype == torch.int16:
        return codes.long() & 0xFFFF
    return codes.long()


def num_groups(size: int, group: int | None) -> int:
    return 1 if group is None else math.ceil(size / group)


class DequantCacheMixin:
    """Optional cache of the dequantized weight (a non-persistent buffer: follows .to(), never saved).

    Forward normally dequantizes on every call (the reference semantics, minimal memory);
    ``cache_dequantized_weight(dtype)`` trades the memory of an uncompressed weight for speed, e.g.
    while ``compress`` runs calibration batches through already-compressed layers.
    """

    def cache_dequantized_weight(self, dtype: torch.dtype | None) -> None:
        """Keep the dequantized weight in ``dtype`` for the reference forward; ``None`` drops it."""
        self.weight_cache = None if dtype is None else self.dequantize_weight(torch.float32).to(dtype)

    def _reference_linear(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.in_features} input features on the last dim, got shape {tuple(x.shape)}"
            )
        cached = self.weight_cache
        weight = (cached if cached is not None else self.dequantize_weight(torch.float32)).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class VQLinear(DequantCacheMixin, nn.Module):
    """A linear layer whose weight is stored as vector codes into (additive) codebooks.

    ``forward`` goes through ``vqlib.kernels.linear``, which runs a registered kernel for the input's
    device and the layer's format, or this layer's reference path: dequantize the weight (in float32,
    then cast to the input dtype) and call ``F.linear``. The reference is the ground truth for kernels;
    ``vqlib.kernels.explain(layer, x)`` says which path a call takes and why.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        vector_dim: int,
        num_codebooks: int = 1,
        codebook_bits: int = 8,
        group_size: int | None = None,
        codebook_dtype: str = "fp16",
        scale_granularity: str = "row",
        scale_group_size: int = 128,
        bias: bool = True,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if codebook_dtype not in ("fp16", "int8"):
            raise ValueError(f"VQLinear: codebook_dtype must be 'fp16' or 'int8', got {codebook_dtype!r}")
        if scale_granularity not in ("row", "group", "none"):
            raise ValueError(f"VQLinear: scale_granularity must be 'row', 'group' or 'none', got {scale_granularity!r}")
        if group_size is not None and group_size % vector_dim:
            raise ValueError(f"VQLinear: group_size {group_size} must be a multiple of vector_dim {vector_dim}")
        if scale_granularity == "group" and scale_group_size % vector_dim:
            raise ValueError(
                f"VQLinear: scale_group_size {scale_group_size} must be a multiple of vector_dim {vector_dim}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.vector_dim = vector_dim
        self.num_codebooks = num_codebooks
        self.codebook_bits = codebook_bits
        self.codebook_size = 2**codebook_bits
        self.group_size = group_size
        self.codebook_dtype = codebook_dtype
        self.scale_granularity = scale_granularity
        self.scale_group_size = scale_group_size if scale_granularity == "group" else None
        self.num_vectors = math.ceil(in_features / vector_dim)
        self.in_padded = self.num_vectors * vector_dim
        self.num_codebook_groups = num_groups(self.in_padded, group_size)
        g, m, k, d = self.num_codebook_groups, num_codebooks, self.codebook_size, vector_dim
        self.register_buffer(
            "codes",
            torch.zeros(out_features, self.num_vectors, m, dtype=code_storage_dtype(codebook_bits), device=device),
        )
        cb_dtype = torch.float16 if codebook_dtype == "fp16" else torch.int8
        self.register_buffer("codebooks", torch.zeros(g, m, k, d, dtype=cb_dtype, device=device))
        if codebook_dtype == "int8":
            self.register_buffer("codebook_scales", torch.ones(g, m, dtype=torch.float16, device=device))
        else:
            self.codebook_scales = None
        if scale_granularity == "none":
            self.scales = None
        else:
            s = 1 if scale_granularity == "row" else num_groups(self.in_padded, scale_group_size)
            self.register_buffer("scales", torch.ones(out_features, s, dtype=torch.float16, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.bias = None
        self.register_buffer("weight_cache", None, persistent=False)

    @classmethod
    def from_parts(
        cls,
        linear: nn.Linear,
        *,
        codes: Tensor,
        codebook_values: Tensor,
        codebook_scales: Tensor | None,
        scales: Tensor | None,
        vector_dim: int,
        codebook_bits: int,
        group_size: int | None,
        codebook_dtype: str,
        scale_granularity: str,
        scale_group_size: int,
    ) -> "VQLinear":
        """Build a layer from int64 codes (out, n_vec, M), storage-exact float codebook values
        (G, M, K, d), int8 codebook scales (G, M) or None, and fp16-exact scales (out, S) or None."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            vector_dim=vector_dim,
            num_codebooks=codes.shape[-1],
            codebook_bits=codebook_bits,
            group_size=group_size,
            codebook_dtype=codebook_dtype,
            scale_granularity=scale_granularity,
            scale_group_size=scale_group_size,
            bias=linear.bias is not None,
            bias_dtype=weight.dtype,
            device=weight.device,
        )
        device = weight.device
        layer.codes.copy_(pack_codes(codes, codebook_bits).to(device))
        if codebook_dtype == "int8":
            layer.codebooks.copy_(
                torch.round(codebook_values / codebook_scales[:, :, None, None]).to(torch.int8).to(device)
            )
            layer.codebook_scales.copy_(codebook_scales.to(torch.float16).to(device))
        else:
            layer.codebooks.copy_(codebook_values.to(torch.float16).to(device))
        if scales is not None:
            layer.scales.copy_(scales.to(torch.float16).to(device))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    # ---- format description -------------------------------------------------------------
    def format_spec(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``VQLinear.from_spec(spec)`` rebuilds an empty layer."""
        return {
            "layer_type": "VQLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "vector_dim": self.vector_dim,
            "num_codebooks": self.num_codebooks,
            "codebook_bits": self.codebook_bits,
            "group_size": self.group_size,
            "codebook_dtype": self.codebook_dtype,
            "scale_granularity": self.scale_granularity,
            "scale_group_size": self.scale_group_size if self.scale_group_size is not None else 128,
            "bias": self.bias is not None,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> "VQLinear":
        args = {k: v for k, v in spec.items() if k not in ("layer_type", "bias_dtype")}
        bias_dtype = getattr(torch, spec.get("bias_dtype") or "float32")
        return cls(bias_dtype=bias_dtype, device=device, **args)

    def storage_bytes(self) -> int:
        """Bytes of everything that encodes the weight (codes, codebooks, their scales, row scales)."""
        tensors = [self.codes, self.codebooks, self.codebook_scales, self.scales]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.storage_bytes() / (self.out_features * self.in_features)

    # ---- decoding ---------------------------------------------------------------------------
    def codebook_values(self) -> Tensor:
        """(G, M, K, d) float32 codebook entries."""
        cb = self.codebooks.float()
        if self.codebook_scales is not None:
            cb = cb * self.codebook_scales.float()[:, :, None, None]
        return cb

    def dequantize_weight(self, dtype: torch.dtype = torch.float32, rows: Tensor | None = None) -> Tensor:
        """The (out, in) weight that this layer computes with; with ``rows`` (a 1-D index), only those rows
        (checks of large layers without a full dense copy)."""
        codes, scales = self.codes, self.scales
        if rows is not None:
            codes, scales = codes[rows], None if scales is None else scales[rows]
        return decode_weight(
            unpack_codes(codes),
            self.codebook_values(),
            None if scales is None else scales.float(),
            vector_dim=self.vector_dim,
            group_size=self.group_size,
            scale_group_size=self.scale_group_size,
        )[:, : self.in_features].to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        from vqlib import kernels  # lazy: vqlib.kernels imports kernel modules that import this one

        return kernels.linear(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, d={self.vector_dim}, "
            f"M={self.num_codebooks}, B={self.codebook_bits}, groups={self.num_codebook_groups}, "
            f"codebook_dtype={self.codebook_dtype}, scales={self.scale_granularity}, "
            f"bits_per_weight={self.bits_per_weight:.3f}"
        )


def vector_group_index(num_vectors: int, vector_dim: int, group: int | None, device=None) -> Tensor:
    """(num_vectors,) group of each vector for a group size in columns (all zeros when None)."""
    if group is None:
        return torch.zeros(num_vectors, dtype=torch.long, device=device)
    return torch.arange(num_vectors, device=device) * vector_dim // group


def flat_code_index(codes: Tensor, codebook_shape: tuple[int, ...], vector_dim: int, group_size: int | None) -> Tensor:
    """Row of each selected entry in the codebooks flattened to (G * M * K, d): codes (out, n_vec, M) -> same shape."""
    _, m, k, _ = codebook_shape
    group_of_vec = vector_group_index(codes.shape[1], vector_dim, group_size, device=codes.device)  # (n_vec,)
    book = group_of_vec[None, :, None] * m + torch.arange(m, device=codes.device)[None, None, :]  # (1, n_vec, M)
    return book * k + codes


def decode_vectors(codes: Tensor, codebooks: Tensor, vector_dim: int, group_size: int | None) -> Tensor:
    """Sum of the selected codebook entries: codes (out, n_vec, M) int64 -> (out, n_vec, d) float."""
    index = flat_code_index(codes, tuple(codebooks.shape), vector_dim, group_size)  # (out, n_vec, M)
    flat = codebooks.reshape(-1, codebooks.shape[-1])  # (G * M * K, d)
    out = flat[index[..., 0]]
    for i in range(1, index.shape[-1]):
        out = out + flat[index[..., i]]
    return out


def decode_weight(
    codes: Tensor,
    codebooks: Tensor,
    scales: Tensor | None,
    *,
    vector_dim: int,
    group_size: int | None,
    scale_group_size: int | None,
) -> Tensor:
    """Dequantize to the padded (out, n_vec * d) float weight (see the module docstring)."""
    vecs = decode_vectors(codes, codebooks, vector_dim, group_size)
    out_features, n_vec, d = vecs.shape
    if scales is not None:
        sg = vector_group_index(n_vec, vector_dim, scale_group_size, device=codes.device)
        vecs = vecs * scales[:, sg, None]
    return vecs.reshape(out_features, n_vec * d)
