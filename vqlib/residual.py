"""ResidualVQ: a stack of vector quantizers, each coding what the previous levels left over."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer
from .core.layout import from_tokens, prepare_input
from .core.seeds import derive_seed
from .core.settings import CodebookSettings
from .output import QuantizerOutput
from .validation import check_indices
from .vector_quantize import ESTIMATORS, VectorQuantize, masked_mse


class ResidualVQ(Quantizer):
    """Residual vector quantization (SoundStream / EnCodec).

    Indices have shape (*tokens, num_quantizers); levels not used in a forward are -1.
    ``quantizer_dropout`` is the probability that a training batch uses a random number of levels
    n ~ U{1..num_quantizers} (SoundStream's bitrate scalability); the draw is seeded by the step count,
    so all DDP ranks agree. ``shared_codebook`` uses one codebook for every level.
    Metrics are 1-D tensors with one entry per level (NaN for levels not run).

    Every level is a :class:`VectorQuantize` of width ``codebook_dim`` (``dim`` when None; projections in and
    out otherwise). Its codebook options are those of VectorQuantize, given flat (``distance=``,
    ``codebook_update=``, ``reparam="simvq"``, ``gradient_estimator="rotation"``, ``search_backend=``, ...)
    or as ``settings=CodebookSettings(...)`` (not both; configs give them flat); ``init_codebook`` initialises
    every level (or is the frozen features of reparam="projector"). The gradient estimator maps the encoder
    output onto the sum of all levels' codes.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        num_quantizers: int,
        *,
        shared_codebook: bool = False,
        quantizer_dropout: float = 0.0,
        codebook_dim: int | None = None,
        init_codebook: Tensor | None = None,
        channel_first: bool = False,
        check_finite: bool = True,
        seed: int = 0,
        settings: CodebookSettings | None = None,
        **codebook_options: Any,
    ):
        super().__init__()
        CodebookSettings.check_names("ResidualVQ", codebook_options)
        # Written as a direct call so that jsonargparse (LightningCLI configs) reads the option types through it.
        options = CodebookSettings(**codebook_options)
        if settings is not None and codebook_options:
            # One source only: a config parser fills every flat option with its default, which would silently
            # override the settings object.
            raise TypeError(
                "ResidualVQ: give the codebook options either flat (decay=..., reparam=...) or as "
                f"settings=CodebookSettings(...), not both; got settings and {sorted(codebook_options)}"
            )
        settings = options if settings is None else settings
        self.save_config(locals())
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be a probability in [0, 1], got {quantizer_dropout}")
        self.settings = settings
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, num_quantizers
        self.num_codes_per_token, self.code_axis = num_quantizers, True  # indices (*tokens, num_quantizers)
        self.shared_codebook, self.quantizer_dropout = shared_codebook, quantizer_dropout
        self.channel_first, self.check_finite, self.seed = channel_first, check_finite, seed
        self.estimator = ESTIMATORS[settings.gradient_estimator]
        inner = codebook_dim or dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.levels = nn.ModuleList(
            VectorQuantize.from_settings(
                inner,
                codebook_size,
                settings,
                init_codebook=init_codebook,
                check_finite=False,
                seed=derive_seed(seed, "level", i),
            )  # fmt: skip
            for i in range(1 if shared_codebook else num_quantizers)
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def level(self, i: int) -> VectorQuantize:
        return self.levels[0 if self.shared_codebook else i]

    # Runs eagerly under torch.compile: the level count steers Python control flow (one graph per count).
    @torch.compiler.disable
    def _active_levels(self, num_quantizers: int | None) -> int:
        if num_quantizers is not None:
            if not 1 <= num_quantizers <= self.num_quantizers:
                raise ValueError(f"num_quantizers must be in [1, {self.num_quantizers}], got {num_quantizers}")
            return num_quantizers
        if not self.training or self.quantizer_dropout == 0:
            return self.num_quantizers
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "quantizer_dropout", int(self.step)))
        if torch.rand((), generator=gen) < self.quantizer_dropout:
            return int(torch.randint(1, self.num_quantizers + 1, (), generator=gen))
        return self.num_quantizers

    def forward(self, x: Tensor, mask: Tensor | None = None, num_quantizers: int | None = None) -> QuantizerOutput:
        tokens, flat_mask, token_shape = prepare_input(x, mask, self.dim, self.channel_first, self.check_finite)
        n_active = self._active_levels(num_quantizers)
        if self.training:
            self.step += 1
        z = self.project_in(tokens)
        with torch.autocast(device_type=z.device.type, enabled=False):
            residual = z.float()
            total = torch.zeros_like(residual)
            indices = torch.full((z.shape[0], self.num_quantizers), -1, dtype=torch.long, device=z.device)
            loss = residual.new_zeros(())
            per_level: dict[str, list[Tensor]] = {}
            for i in range(n_active):
                q, idx, level_loss, metrics = self.level(i).quantize_tokens(residual.detach(), flat_mask)
                # Codebook gradients (if any) flow through level_loss; the output's gradient is one
                # straight-through estimator on the sum, so q itself is a constant here.
                total = total + q.detach()
                residual = residual - q.detach()
                indices[:, i] = idx[:, 0]
                # commitment: the encoder output is pulled towards each level's reconstruction of its residual
                loss = loss + level_loss + self._commitment(z, total, i, flat_mask)
                for key, value in metrics.items():
                    per_level.setdefault(key, []).append(value)
            quantized = self.estimator(z.float(), total)
        nan = torch.full((self.num_quantizers - n_active,), float("nan"), device=z.device)
        metrics = {k: torch.cat([torch.stack(v), nan]) for k, v in per_level.items()}
        metrics["num_quantizers"] = torch.tensor(float(n_active))
        out = from_tokens(self.project_out(quantized).to(x.dtype), token_shape, self.channel_first)
        return QuantizerOutput(out, indices.reshape(*token_shape, self.num_quantizers), loss, metrics)

    def encode(self, x: Tensor, mask: Tensor | None = None, num_quantizers: int | None = None) -> Tensor:
        """Indices (*tokens, num_quantizers) of the first ``num_quantizers`` levels (-1 after), never updating state."""
        return super().encode(x, mask, num_quantizers=num_quantizers)

    def _commitment(self, z: Tensor, total: Tensor, i: int, mask: Tensor | None) -> Tensor:
        # Level losses above were computed on detached residuals (they train the codebooks);
        # this term trains the encoder towards the running reconstruction.
        weight = None if mask is None else mask.float()
        return self.level(i).commitment_weight * masked_mse(z.float(), total.detach(), weight)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (*tokens, n) with 1 <= n <= num_quantizers, the first n levels (trailing -1 = unused level)."""
        if not isinstance(indices, Tensor) or indices.ndim < 1:
            raise ValueError(
                f"indices: expected shape (*tokens, n_levels), got {getattr(indices, 'shape', type(indices))}"
            )
        n = indices.shape[-1]
        if not 1 <= n <= self.num_quantizers:
            raise ValueError(f"indices: expected 1..{self.num_quantizers} levels on the last axis, got {n}")
        check_indices(indices, self.codebook_size, allow_negative_one=True)
        flat = indices.reshape(-1, n)
        used = flat >= 0
        if (used[:, 1:] & ~used[:, :-1]).any():
            raise ValueError("indices: a level is used after an unused (-1) level; only trailing levels may be -1")
        token_shape = tuple(indices.shape[:-1])
        with torch.autocast(device_type=indices.device.type, enabled=False):
            total = None
            for i in range(n):
                if not used[:, i].any():
                    break
                q = self.level(i).lookup_codes(flat[:, i : i + 1].clamp_min(0)) * used[:, i : i + 1]
                total = q if total is None else total + q
        return from_tokens(self.project_out(total), token_shape, self.channel_first)
