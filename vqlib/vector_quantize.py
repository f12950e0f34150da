"""VectorQuantize: nearest-code vector quantization with large-codebook reparameterisations."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .base import Quantizer, usage_metrics
from .core.codebook import Codebook
from .core.estimators import rotation_trick, straight_through
from .core.layout import from_tokens, prepare_input
from .core.search import DEFAULT_MAX_ELEMENTS, SearchBackend
from .core.seeds import derive_seed
from .core.settings import CodebookSettings, CodebookUpdate, Distance, GradientEstimator, Reparam
from .output import QuantizerOutput
from .validation import check_indices

ESTIMATORS = {"ste": straight_through, "rotation": rotation_trick}


def masked_mse(a: Tensor, b: Tensor, weight: Tensor | None) -> Tensor:
    """Mean squared error over tokens (n, d), counting only tokens with weight 1."""
    err = (a - b).pow(2).mean(-1)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


class VectorQuantize(Quantizer):
    """Vector quantization layer.

    Args:
        dim: feature dimension of the input.
        codebook_size: number of codes.
        codebook_dim: lower code dimension (adds in/out linear projections); per head.
        heads: split each token into ``heads`` sub-vectors quantized independently
            (indices gain a trailing ``heads`` axis); ``separate_codebook_per_head`` gives each its own codebook.
        distance: "euclidean" or "cosine" (codes and inputs l2-normalised).
        codebook_update: "ema" (decay + Laplace smoothing ``eps``), "gradient" (codebook loss) or "frozen".
        reparam: "simvq" (frozen random basis times a learnable linear map: every step moves every code)
            or "projector" (VQGAN-LC: frozen ``init_codebook`` features (codebook_size, feature_dim) with a
            learnable projector). Both need codebook_update="gradient".
        init_codebook: initial codes (codebook_size, codebook_dim), or the frozen features for "projector".
        kmeans_init: initialise codes with Faiss k-means on the first training batch (gathered over ranks).
        dead_code_window: re-seed codes unused for this many training steps from current inputs (0 = off).
        gradient_estimator: "ste" (straight-through) or "rotation" (rotation trick).
        commitment_weight / codebook_weight: loss weights; the codebook term applies to learned codebooks.
        channel_first: inputs are (b, dim, *spatial).
        check_finite: reject NaN/Inf inputs with an error (default) instead of letting them reach the codebook.
        search_max_elements: memory bound of the nearest-code search, in float32 scores per block.
        search_backend: "auto", "torch" or "faiss".

    The codebook options (distance ... search_backend) are gathered into one
    :class:`~vqlib.core.settings.CodebookSettings` (``self.settings``), which the codebooks take;
    :meth:`from_settings` builds a VectorQuantize from one.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        distance: Distance = "euclidean",
        codebook_update: CodebookUpdate = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        reparam: Reparam = "none",
        init_codebook: Tensor | None = None,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        dead_code_window: int = 0,
        usage_window: int = 100,
        gradient_estimator: GradientEstimator = "ste",
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        channel_first: bool = False,
        check_finite: bool = True,
        search_max_elements: int = DEFAULT_MAX_ELEMENTS,
        search_backend: SearchBackend = "auto",
        seed: int = 0,
    ):
        super().__init__()
        self.save_config(locals())
        settings = CodebookSettings.from_locals(locals())
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when codebook_dim is not given")
            codebook_dim = dim // heads
        if separate_codebook_per_head and heads == 1:
            raise ValueError("separate_codebook_per_head=True needs heads > 1")
        self.settings = settings
        self.dim, self.codebook_size, self.codebook_dim, self.heads = dim, codebook_size, codebook_dim, heads
        # Layout facts of the Quantizer interface: one code per head; a trailing heads axis when heads > 1.
        self.num_codes_per_token, self.code_axis = heads, heads > 1
        self.channel_first, self.check_finite = channel_first, check_finite
        self.commitment_weight, self.codebook_weight = settings.commitment_weight, settings.codebook_weight
        self.estimator = ESTIMATORS[settings.gradient_estimator]
        self.learned_by_gradient = settings.codebook_update == "gradient"

        inner = heads * codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        n_books = heads if separate_codebook_per_head else 1
        self.codebooks = nn.ModuleList(
            Codebook(
                codebook_size, codebook_dim, settings, init_codebook=init_codebook, seed=derive_seed(seed, "head", i)
            )
            for i in range(n_books)
        )

    @classmethod
    def from_settings(cls, dim: int, codebook_size: int, settings: CodebookSettings, **layout: Any) -> VectorQuantize:
        """Build from a :class:`CodebookSettings`; ``layout`` takes the other keyword arguments (codebook_dim,
        heads, init_codebook, channel_first, check_finite, seed, ...). The config records the flat options."""
        return cls(dim, codebook_size, **settings.as_kwargs(), **layout)

    @property
    def codebook(self) -> Tensor:
        """Current code vectors: (codebook_size, codebook_dim), or (heads, ...) with separate codebooks."""
        codes = [cb.codes().detach() for cb in self.codebooks]
        return codes[0] if len(codes) == 1 else torch.stack(codes)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        tokens, flat_mask, token_shape = prepare_input(x, mask, self.dim, self.channel_first, self.check_finite)
        z = self.project_in(tokens)
        q, indices, loss, metrics = self.quantize_tokens(z, flat_mask)
        out = from_tokens(self.project_out(q).to(x.dtype), token_shape, self.channel_first)
        idx_shape = token_shape if self.heads == 1 else (*token_shape, self.heads)
        return QuantizerOutput(out, indices.reshape(idx_shape), loss, metrics)

    def quantize_tokens(
        self, z: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Quantize already-projected tokens z (n, heads * codebook_dim).

        Returns (quantized (n, heads*codebook_dim) float32 with estimator gradients, indices (n, heads),
        loss, metrics). Training mode also updates codebook state. Used by ResidualVQ for each level.
        """
        n = z.shape[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = rearrange(z.float(), "n (h d) -> n h d", h=self.heads)
            if self.codebooks[0].cosine:
                z = F.normalize(z, dim=-1)
            weight = None if mask is None else mask.float()
            head_weight = None if weight is None else weight.repeat_interleave(self.heads)
            if len(self.codebooks) == 1:
                indices, q = self._quantize_heads(self.codebooks[0], z.reshape(-1, self.codebook_dim), head_weight)
                indices, q = indices.view(n, self.heads), q.view(n, self.heads, -1)
            else:
                parts = [self._quantize_heads(cb, z[:, h], weight) for h, cb in enumerate(self.codebooks)]
                indices = torch.stack([p[0] for p in parts], dim=1)
                q = torch.stack([p[1] for p in parts], dim=1)
            loss = self.commitment_weight * masked_mse(z.flatten(1), q.detach().flatten(1), weight)
            if self.learned_by_gradient and self.codebook_weight > 0:
                loss = loss + self.codebook_weight * masked_mse(q.flatten(1), z.detach().flatten(1), weight)
            quantized = self.estimator(z.reshape(n * self.heads, -1), q.reshape(n * self.heads, -1))
        metrics = self._metrics(indices if mask is None else indices[mask])
        return rearrange(quantized, "(n h) d -> n (h d)", h=self.heads), indices, loss, metrics

    def _quantize_heads(self, codebook: Codebook, z: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.training:
            codebook.maybe_init(z.detach() if weight is None else z.detach()[weight > 0])
        indices = codebook.search(z.detach())
        q = codebook.lookup(indices)
        if self.training:
            codebook.update_state(z.detach(), indices, weight)
        return indices, q

    @torch.no_grad()
    def _metrics(self, indices: Tensor) -> dict[str, Tensor]:
        metrics = usage_metrics(indices, self.codebook_size * len(self.codebooks))
        states = [cb.state_metrics() for cb in self.codebooks]
        for key in states[0]:
            metrics[key] = torch.stack([s[key] for s in states]).mean()
        return metrics

    def decode(self, indices: Tensor) -> Tensor:
        """Codes for ``indices`` -> quantized features, equal to forward's output in eval mode."""
        check_indices(indices, self.codebook_size)
        if self.heads > 1:
            if indices.ndim < 1 or indices.shape[-1] != self.heads:
                raise ValueError(
                    f"indices: expected a trailing axis of {self.heads} heads, got shape {tuple(indices.shape)}"
                )
            token_shape = tuple(indices.shape[:-1])
        else:
            token_shape = tuple(indices.shape)
        if self.channel_first and len(token_shape) < 1:
            raise ValueError(
                f"indices: channel_first decode expects (b, *spatial) indices, got shape {tuple(indices.shape)}"
            )
        flat = indices.reshape(-1, self.heads)
        q = self.lookup_codes(flat)
        return from_tokens(self.project_out(q), token_shape, self.channel_first)

    def lookup_codes(self, flat: Tensor) -> Tensor:
        """(n, heads) indices -> (n, heads * codebook_dim) float32 codes (no input checks)."""
        if len(self.codebooks) == 1:
            q = self.codebooks[0].lookup(flat)
        else:
            q = torch.stack([cb.lookup(flat[:, h]) for h, cb in enumerate(self.codebooks)], dim=1)
        return q.flatten(1)
