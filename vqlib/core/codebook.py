"""The one codebook implementation every vector quantizer builds on.

It owns: the code vectors (learned by EMA, by gradient, frozen, or reparameterised as SimVQ's
frozen basis times a learnable map or VQGAN-LC's frozen feature codebook plus a projector), exact
nearest-code search, k-means initialisation, EMA statistics with Laplace smoothing, usage tracking and
dead-code restart. All statistics are reduced across ranks and all random choices are made on rank 0
and broadcast, so every rank ends every step with a bit-identical codebook. Search and updates run in
float32 whatever autocast says.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist
from .kmeans import kmeans
from .search import nearest_code
from .seeds import derive_seed
from .settings import CodebookSettings, CodebookUpdate, Distance, Reparam

log = logging.getLogger(__name__)

__all__ = ["Codebook", "CodebookSettings", "CodebookUpdate", "Distance", "Reparam"]


class Codebook(nn.Module):
    """``codebook_size`` codes of ``dim`` features, configured by one :class:`CodebookSettings`.

    ``init_codebook``: initial codes (codebook_size, dim), or the frozen features (codebook_size, feature_dim)
    of reparam="projector". ``seed`` seeds the initial codes, k-means and dead-code draws.
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        settings: CodebookSettings = CodebookSettings(),
        *,
        init_codebook: Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size} and {dim}")
        if settings.reparam == "projector" and init_codebook is None:
            raise ValueError(
                "reparam='projector' needs init_codebook: a (codebook_size, feature_dim) tensor of features"
            )
        self.settings = settings
        self.codebook_size, self.dim, self.seed = codebook_size, dim, seed
        self.cosine = settings.distance == "cosine"
        self.update, self.reparam, self.decay, self.eps = (
            settings.codebook_update,
            settings.reparam,
            settings.decay,
            settings.eps,
        )
        self.kmeans_init, self.kmeans_iters = settings.kmeans_init, settings.kmeans_iters
        self.dead_code_window, self.usage_window = settings.dead_code_window, settings.usage_window
        self.search_max_elements, self.search_backend = settings.search_max_elements, settings.search_backend

        if settings.reparam != "none":
            self._init_reparam(init_codebook)
        else:
            self._init_embed(init_codebook)
        needs_init = self.kmeans_init or (init_codebook is None and self.reparam == "none")
        self.register_buffer("initted", torch.tensor(not needs_init))
        self.register_buffer("steps_since_used", torch.full((codebook_size,), self.usage_window, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, "codebook_init"))

    def _init_reparam(self, init_codebook: Tensor | None) -> None:
        k, dim = self.codebook_size, self.dim
        if self.reparam == "projector":
            feats = init_codebook.detach().float()
            if feats.ndim != 2 or feats.shape[0] != k:
                raise ValueError(
                    f"init_codebook for reparam='projector' must be ({k}, feature_dim), got {tuple(feats.shape)}"
                )
            self.register_buffer("basis", feats.clone())
            self.proj = nn.Linear(feats.shape[1], dim, bias=False)
        else:
            # SimVQ: frozen Gaussian basis C; the learnable map W moves every code each step (codes = C W).
            self.register_buffer("basis", torch.randn(k, dim, generator=self._generator()) * dim**-0.5)
            self.proj = nn.Linear(dim, dim, bias=True)

    def _init_embed(self, init_codebook: Tensor | None) -> None:
        k, dim = self.codebook_size, self.dim
        if init_codebook is not None:
            if tuple(init_codebook.shape) != (k, dim):
                raise ValueError(f"init_codebook must be ({k}, {dim}), got {tuple(init_codebook.shape)}")
            embed = init_codebook.detach().float().clone()
        else:
            embed = torch.randn(k, dim, generator=self._generator())
            if self.cosine:
                embed = F.normalize(embed, dim=-1)
        if self.update == "gradient":
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        if self.update == "ema":
            self.register_buffer("embed_avg", embed.clone())
            self.register_buffer("cluster_size", torch.ones(k))

    # ---- code vectors -------------------------------------------------------------------------
    def codes(self) -> Tensor:
        """All code vectors (k, dim) in float32; differentiable where the codebook is learned."""
        with torch.autocast(device_type=self._device_type(), enabled=False):
            if self.reparam != "none":
                w = self.proj(self.basis.float())
            else:
                w = self.embed.float()
        return F.normalize(w, dim=-1) if self.cosine else w

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors for ``indices`` (any shape) -> (*indices.shape, dim), float32, differentiable.

        Gathers before projecting so a lookup costs O(tokens), not O(codebook)."""
        with torch.autocast(device_type=self._device_type(), enabled=False):
            if self.reparam != "none":
                w = self.proj(self.basis[indices].float())
            else:
                w = self.embed.float()[indices]
        return F.normalize(w, dim=-1) if self.cosine else w

    def search(self, x: Tensor) -> Tensor:
        """Nearest code index for each row of x (n, dim)."""
        with torch.no_grad():
            codes = self.codes().detach()
        return nearest_code(
            x, codes, cosine=self.cosine, max_elements=self.search_max_elements, backend=self.search_backend
        )

    def _device_type(self) -> str:
        return self.steps_since_used.device.type

    # ---- training-time state updates ------------------------------------------------------------
    @torch.no_grad()
    def maybe_init(self, x: Tensor) -> None:
        """First training step: k-means (or data-sampled) initialisation, identical on every rank."""
        if bool(self.initted):
            return
        if self.kmeans_init:
            samples = dist.all_gather_rows(x.float())
            if dist.rank() == 0:
                new = self._kmeans_codes(samples)
            else:
                new = torch.empty(self.codebook_size, self.dim, device=x.device)
            self._set_codes(torch.arange(self.codebook_size, device=x.device), dist.broadcast(new.contiguous()))
        else:
            # Random init: make sure every rank starts from rank 0's codes.
            if self.update != "gradient" and self.reparam == "none":
                dist.broadcast(self.embed.data)
                if self.update == "ema":
                    dist.broadcast(self.embed_avg)
        self.initted.fill_(True)

    def _kmeans_codes(self, samples: Tensor) -> Tensor:
        n, k = samples.shape[0], self.codebook_size
        if self.cosine:
            samples = F.normalize(samples, dim=-1)
        if n >= k:
            return kmeans(samples, k, num_iters=self.kmeans_iters, seed=self.seed, spherical=self.cosine).to(
                samples.device
            )
        # Fewer vectors than codes: documented rule — every vector becomes a code and the rest are
        # vectors drawn with replacement plus small noise, so no two codes coincide.
        log.warning("k-means init: %d vectors for %d codes; seeding codes from data samples instead", n, k)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        pick = torch.cat([torch.arange(n), torch.randint(n, (k - n,), generator=gen)]).to(samples.device)
        noise = torch.randn(k, self.dim, generator=gen).to(samples.device) * samples.std() * 0.01
        noise[:n] = 0
        new = samples[pick] + noise
        return F.normalize(new, dim=-1) if self.cosine else new

    @torch.no_grad()
    def _set_codes(self, which: Tensor, values: Tensor) -> None:
        if self.reparam != "none":  # pragma: no cover - guarded in __init__
            raise RuntimeError("reparameterised codebooks cannot be overwritten")
        self.embed.data[which] = values.to(self.embed.dtype)
        if self.update == "ema":
            self.embed_avg[which] = values
            self.cluster_size[which] = 1.0

    @torch.no_grad()
    def update_state(self, x: Tensor, indices: Tensor, weight: Tensor | None) -> None:
        """After a training forward: EMA update, usage tracking and dead-code restart.

        x (n, dim) float32 detached, indices (n,), weight (n,) float mask or None.
        """
        k = self.codebook_size
        w = torch.ones(x.shape[0], device=x.device) if weight is None else weight.float()
        counts = torch.zeros(k, device=x.device).index_add_(0, indices, w)
        if self.update == "ema":
            if self.cosine:
                x = F.normalize(x, dim=-1)
            sums = torch.zeros(k, self.dim, device=x.device).index_add_(0, indices, x * w[:, None])
            stats = dist.all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
            counts, sums = stats[:, 0], stats[:, 1:]
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n  # Laplace smoothing
            embed = self.embed_avg / smoothed[:, None]
            self.embed.copy_(F.normalize(embed, dim=-1) if self.cosine else embed)
        else:
            dist.all_reduce_sum(counts)
        self.step += 1
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_window > 0:
            self._restart_dead_codes(x, weight)

    def _restart_dead_codes(self, x: Tensor, weight: Tensor | None) -> None:
        if int(self.step) < self.dead_code_window:
            return  # no code can have been unused for a whole window yet
        dead = (self.steps_since_used >= self.dead_code_window).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Replacements come from rank 0's current (unmasked) inputs and are broadcast.
        if dist.rank() == 0:
            pool = x if weight is None else x[weight > 0]
            if pool.shape[0] == 0:
                pool = x
            gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, "dead_code_restart", int(self.step)))
            pick = torch.randint(pool.shape[0], (dead.numel(),), generator=gen).to(x.device)
            new = pool[pick].contiguous()
        else:
            new = torch.empty(dead.numel(), self.dim, device=x.device)
        new = dist.broadcast(new)
        self._set_codes(dead, F.normalize(new, dim=-1) if self.cosine else new)
        self.steps_since_used[dead] = 0

    # ---- diagnostics -----------------------------------------------------------------------------
    def state_metrics(self) -> dict[str, Tensor]:
        window = self.dead_code_window if self.dead_code_window > 0 else self.usage_window
        return {
            "usage": (self.steps_since_used < self.usage_window).float().mean(),
            "dead_codes": (self.steps_since_used >= window).sum().float(),
        }
