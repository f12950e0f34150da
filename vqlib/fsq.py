"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``len(levels)`` channels is bounded with a tanh and rounded to one of ``levels[i]`` values;
the code index is the mixed-radix number formed by the per-channel digits. The codebook
(``prod(levels)`` codes) is implicit and never enumerated: index <-> code maths is per token, so
codebooks of 2^30+ codes cost nothing more than small ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import usage_metrics
from .core.implicit import ImplicitCodebookQuantizer, project
from .core.layout import from_tokens, prepare_input
from .output import QuantizerOutput
from .validation import check_indices

_INT64_MAX = 2**63 - 1


class FSQ(ImplicitCodebookQuantizer):
    """Finite scalar quantizer.

    Args:
        levels: number of quantization levels per code channel, each >= 2 (e.g. ``[8, 5, 5, 5]``);
            ``codebook_size = prod(levels)``.
        dim: feature size of the input; when it differs from ``len(levels)`` a Linear ``project_in``
            / ``project_out`` pair maps between the two. ``None`` means ``len(levels)``.
        channel_first: inputs are ``(batch, dim, *spatial)`` instead of ``(..., dim)``.
        check_finite: reject NaN/Inf inputs (set False to skip the check, e.g. for speed).
        eps: widens the tanh bound slightly so that the extreme levels are reachable (as in the paper).

    Codes live on the normalised grid ``(digit - levels // 2) / (levels // 2)`` in ``[-1, 1]``.
    The loss is always zero: FSQ needs no auxiliary loss. Gradients pass straight through the rounding.
    """

    def __init__(
        self,
        levels: list[int],
        dim: int | None = None,
        *,
        channel_first: bool = False,
        check_finite: bool = True,
        eps: float = 1e-3,
    ) -> None:
        self.save_config(locals())
        super().__init__()
        levels = list(levels)
        if len(levels) == 0:
            raise ValueError("FSQ: expected at least one level, got an empty list")
        for i, level in enumerate(levels):
            if isinstance(level, bool) or not isinstance(level, int) or level < 2:
                raise ValueError(f"FSQ: expected every level to be an integer >= 2, got levels[{i}] = {level!r}")
        codebook_size = math.prod(levels)
        if codebook_size > _INT64_MAX:
            raise ValueError(f"FSQ: expected prod(levels) <= 2**63 - 1 so indices fit in int64, got {codebook_size}")
        if dim is not None and dim < 1:
            raise ValueError(f"FSQ: expected dim >= 1 or None, got {dim}")
        if not eps >= 0:
            raise ValueError(f"FSQ: expected eps >= 0, got {eps}")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.codebook_size = codebook_size
        self.channel_first = channel_first
        self.check_finite = check_finite
        self.eps = eps

        has_projections = self.dim != self.codebook_dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if has_projections else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if has_projections else nn.Identity()

        levels_t = torch.tensor(levels, dtype=torch.int64)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), dim=0)
        # Derived from the config, so kept out of the state dict.
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_half_width", levels_t // 2, persistent=False)

    # -- per-token index <-> code maths -------------------------------------------------------

    def _bound(self, z: Tensor) -> Tensor:
        """tanh bound to (-L/2, L/2) (shifted by half a level for even L so rounding gives L values)."""
        levels = self._levels.float()
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = (self._levels % 2 == 0).float() * 0.5
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def _digits_to_codes(self, digits: Tensor) -> Tensor:
        # The single place codes are built from integers, shared by forward and decode: exact round trips.
        half_width = self._half_width
        return (digits - half_width).float() / half_width.float()

    def _indices_to_digits(self, indices: Tensor) -> Tensor:
        return torch.div(indices.unsqueeze(-1), self._basis, rounding_mode="floor") % self._levels

    # -- public API ----------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        tokens, flat_mask, token_shape = prepare_input(x, mask, self.dim, self.channel_first, self.check_finite)
        z = project(self.project_in, tokens).float()
        bounded = self._bound(z)
        digits = (bounded.round() + self._half_width).long()
        indices = (digits * self._basis).sum(dim=-1)
        codes = self._digits_to_codes(digits)
        # Straight-through: the forward value is exactly `codes` (z - z.detach() is exactly 0 for finite z),
        # the gradient is that of the normalised bounded z.
        z_normalised = bounded / self._half_width.float()
        codes = codes + (z_normalised - z_normalised.detach())
        quantized = from_tokens(project(self.project_out, codes).to(x.dtype), token_shape, self.channel_first)
        metrics = usage_metrics(indices if flat_mask is None else indices[flat_mask], self.codebook_size)
        indices = indices.reshape(token_shape)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        return QuantizerOutput(quantized=quantized, indices=indices, loss=loss, metrics=metrics)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Normalised codes ``(..., len(levels))`` in ``[-1, 1]`` (before ``project_out``)."""
        check_indices(indices, self.codebook_size)
        return self._digits_to_codes(self._indices_to_digits(indices.long()))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, dim={self.dim}, codebook_size={self.codebook_size}"
