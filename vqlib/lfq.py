"""Lookup-free quantization (Yu et al. 2023, MAGVIT-v2) and its spherical variant BSQ
(Zhao et al. 2024, "Image and Video Tokenization with Binary Spherical Quantization").

Each of the ``K = log2(codebook_size)`` channels is quantized to its sign; the index is the K bits read as
an integer (first channel = most significant bit). The codebook (2^K codes) is implicit and never enumerated.

Entropy loss, factorised: the per-token soft assignment ``softmax(-||z - c||^2 / temperature)`` over all 2^K
codes is a product of independent per-bit distributions, so the per-sample entropy is exactly the sum over
groups of bits. The codebook (batch-averaged) entropy is not: like Open-MAGVIT2's sub-codebooks we split the
K bits into groups of at most ``entropy_group_bits`` bits, enumerate only the 2^group codes of each group and
sum the group entropies. That sum is an upper bound of the full codebook entropy (entropy is subadditive),
exact when groups are independent across the batch; it costs ``tokens * 2^group`` memory per group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import usage_metrics
from .core.implicit import ImplicitCodebookQuantizer, project
from .core.layout import from_tokens, prepare_input
from .output import QuantizerOutput
from .validation import check_indices

_MAX_BITS = 62  # indices are int64


class LFQ(ImplicitCodebookQuantizer):
    """Lookup-free quantizer (``spherical=True``: binary spherical quantizer, BSQ).

    Args:
        dim: feature size of the input; when it differs from ``log2(codebook_size)`` a Linear
            ``project_in`` / ``project_out`` pair maps between the two.
        codebook_size: number of codes, a power of two (2 .. 2^62).
        entropy_weight: weight of the entropy loss ``per_sample_entropy - diversity_weight * codebook_entropy``
            (per-sample entropy is minimised for confident codes; codebook entropy maximised for usage).
        diversity_weight: weight of the codebook entropy inside the entropy loss.
        commitment_weight: weight of ``mse(z, code.detach())``, z the (projected) input.
        codebook_scale: codes are ``+-codebook_scale`` (LFQ only; must be 1.0 when spherical).
        temperature: of the soft assignment used by the entropy loss.
        entropy_group_bits: maximum bits per group in the factorised codebook entropy (Open-MAGVIT2 uses 9).
        spherical: BSQ: l2-normalise z and use codes ``sign(z) / sqrt(K)`` (unit norm).
        channel_first: inputs are ``(batch, dim, *spatial)`` instead of ``(..., dim)``.
        check_finite: reject NaN/Inf inputs.

    The loss and entropies are computed in float32 (autocast disabled) and only over real tokens of ``mask``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        commitment_weight: float = 0.25,
        codebook_scale: float = 1.0,
        temperature: float = 0.01,
        entropy_group_bits: int = 9,
        spherical: bool = False,
        channel_first: bool = False,
        check_finite: bool = True,
    ) -> None:
        self.save_config(locals())
        super().__init__()
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"LFQ: expected codebook_size to be an integer power of two >= 2, got {codebook_size!r}")
        if codebook_size & (codebook_size - 1):
            lower = 1 << (codebook_size.bit_length() - 1)
            raise ValueError(
                f"LFQ: expected codebook_size to be a power of two (e.g. {lower} or {2 * lower}), got {codebook_size}"
            )
        num_bits = codebook_size.bit_length() - 1
        if num_bits > _MAX_BITS:
            raise ValueError(f"LFQ: expected codebook_size <= 2**{_MAX_BITS} (int64 indices), got 2**{num_bits}")
        if dim < 1:
            raise ValueError(f"LFQ: expected dim >= 1, got {dim}")
        if entropy_group_bits < 1:
            raise ValueError(f"LFQ: expected entropy_group_bits >= 1, got {entropy_group_bits}")
        if not temperature > 0:
            raise ValueError(f"LFQ: expected temperature > 0, got {temperature}")
        if not codebook_scale > 0:
            raise ValueError(f"LFQ: expected codebook_scale > 0, got {codebook_scale}")
        if spherical and codebook_scale != 1.0:
            raise ValueError(
                f"LFQ: spherical=True fixes codes to sign(z)/sqrt(K); expected codebook_scale=1.0, got {codebook_scale}"
            )
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = num_bits
        self.entropy_weight = entropy_weight
        self.diversity_weight = diversity_weight
        self.commitment_weight = commitment_weight
        self.temperature = temperature
        self.entropy_group_bits = entropy_group_bits
        self.spherical = spherical
        self.channel_first = channel_first
        self.check_finite = check_finite
        self.code_value = 1.0 / math.sqrt(num_bits) if spherical else float(codebook_scale)

        has_projections = dim != num_bits
        self.project_in = nn.Linear(dim, num_bits) if has_projections else nn.Identity()
        self.project_out = nn.Linear(num_bits, dim) if has_projections else nn.Identity()
        # Bit shifts, most significant first; derived from the config so kept out of the state dict.
        self.register_buffer("_shifts", torch.arange(num_bits - 1, -1, -1, dtype=torch.int64), persistent=False)

    # -- per-token index <-> code maths -------------------------------------------------------

    def _bits_to_codes(self, bits: Tensor) -> Tensor:
        # The single place codes are built, shared by forward and decode: exact round trips.
        value = torch.tensor(self.code_value, dtype=torch.float32, device=bits.device)
        return torch.where(bits, value, -value)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Codes ``(..., K)`` with entries ``+-code_value`` (before ``project_out``)."""
        check_indices(indices, self.codebook_size)
        bits = (indices.long().unsqueeze(-1) >> self._shifts) & 1
        return self._bits_to_codes(bits.bool())

    def _entropies(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(per-sample entropy, factorised codebook entropy) of z (n, K) float32, summed over bit groups."""
        per_sample = z.new_zeros(())
        codebook = z.new_zeros(())
        if z.shape[0] == 0:
            return per_sample, codebook
        for start in range(0, self.codebook_dim, self.entropy_group_bits):
            group = z[:, start : start + self.entropy_group_bits]
            group_bits = group.shape[1]
            shifts = torch.arange(group_bits - 1, -1, -1, device=z.device)
            all_bits = (torch.arange(2**group_bits, device=z.device).unsqueeze(-1) >> shifts) & 1
            group_codes = self._bits_to_codes(all_bits.bool())  # (2^g, g): small, per group only
            # -||z - c||^2 / T up to terms constant over codes (all codes have the same norm).
            logits = group @ (group_codes.t() * (2 / self.temperature))
            log_p = logits.log_softmax(dim=-1).clamp_min(-80.0)  # exp(-80) ~ 2e-35: no denormals
            p = log_p.exp()
            per_sample = per_sample - (p * log_p).sum(dim=-1).mean()
            avg_p = p.mean(dim=0)
            codebook = codebook - (avg_p * avg_p.clamp_min(1e-30).log()).sum()
        return per_sample, codebook

    # -- public API ----------------------------------------------------------------------------

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        tokens, flat_mask, token_shape = prepare_input(x, mask, self.dim, self.channel_first, self.check_finite)
        z = project(self.project_in, tokens)
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = z.float()
            if self.spherical:
                z = F.normalize(z, dim=-1)
            bits = z > 0
            indices = (bits.long() << self._shifts).sum(dim=-1)
            codes = self._bits_to_codes(bits)

            z_kept = z if flat_mask is None else z[flat_mask]
            metrics = usage_metrics(indices if flat_mask is None else indices[flat_mask], self.codebook_size)
            loss = z.new_zeros(())
            if self.entropy_weight != 0:
                per_sample, codebook = self._entropies(z_kept)
                loss = loss + self.entropy_weight * (per_sample - self.diversity_weight * codebook)
                metrics["per_sample_entropy"] = per_sample.detach()
                metrics["codebook_entropy"] = codebook.detach()
            if self.commitment_weight != 0 and z_kept.shape[0] > 0:
                codes_kept = codes if flat_mask is None else codes[flat_mask]
                commitment = F.mse_loss(z_kept, codes_kept)
                loss = loss + self.commitment_weight * commitment
                metrics["commitment"] = commitment.detach()

            # Straight-through: the forward value is exactly `codes` (z - z.detach() is exactly 0 for finite z).
            codes = codes + (z - z.detach())
        quantized = from_tokens(project(self.project_out, codes).to(x.dtype), token_shape, self.channel_first)
        return QuantizerOutput(quantized=quantized, indices=indices.reshape(token_shape), loss=loss, metrics=metrics)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, spherical={self.spherical}, "
            f"entropy_group_bits={self.entropy_group_bits}"
        )
