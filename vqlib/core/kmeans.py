"""Lloyd's k-means (weighted, optionally spherical) on top of the shared exact nearest-code search.

Each iteration is one exact search and one weighted centroid update: on CPU for low-dimensional
vectors both in one fused pass (``vqlib.core.lloyd``), otherwise ``vqlib.core.search.nearest_code``
(Faiss' exact k-NN on CPU and on CUDA with faiss-gpu, blocked GEMM otherwise) and a bincount. Faiss' own
``Kmeans`` was the previous engine: on 2 CPU cores it took 14-18 ms per iteration for 16,384 4-dim
vectors and 256 centroids where the search it runs takes 1.5 ms, and compressing a language model
runs thousands of such small k-means (one per 128-column group of every layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lloyd import fused_lloyd_applies, lloyd_step
from .search import nearest_code


@torch.compiler.disable  # an iterative, data-dependent loop: under torch.compile it runs eagerly, as before
@torch.no_grad()
def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    num_iters: int = 20,
    seed: int = 0,
    weights: Tensor | None = None,
    spherical: bool = False,
    init: Tensor | None = None,
) -> Tensor:
    """Cluster rows of ``x`` (n, d) into ``num_clusters`` centroids (float32 (k, d), on ``x``'s device).

    Starts from ``num_clusters`` distinct rows drawn with ``seed``; ``weights`` (n,) weights each
    vector in the centroid updates; ``spherical`` keeps the centroids on the unit sphere. A cluster
    left empty is moved to the vector that is currently worst represented, so no centroid is wasted.
    ``init`` (k, d) starts from given centroids instead (a warm start, e.g. a neighbouring group's
    codebook). Stops early at a fixed point. Requires ``n >= num_clusters``.
    """
    n, w = _checked(x, num_clusters, weights)
    x = x.detach().float()
    centroids = _initial(x, num_clusters, seed, init)  # (k, d)
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=-1)
    fused = fused_lloyd_applies(x, centroids)
    weighted = None if fused else torch.cat([x * w[:, None], w[:, None]], 1).double()  # (n, d + 1), made once
    for _ in range(num_iters):
        if fused:  # search and sums in one pass over the data (vqlib.core.lloyd)
            assign, acc = lloyd_step(x, centroids, w)
        else:
            assign = nearest_code(x, centroids)  # (n,)
            acc = _sums(weighted, assign, centroids.shape[0])
        updated = _update(x, w, acc, assign, centroids, spherical)
        if torch.equal(updated, centroids):  # a fixed point: further iterations change nothing
            break
        centroids = updated
    return centroids


def _initial(x: Tensor, num_clusters: int, seed: int, init: Tensor | None) -> Tensor:
    if init is not None:
        if init.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"kmeans: init must have shape ({num_clusters}, {x.shape[1]}), got {tuple(init.shape)}")
        return init.detach().float().to(x.device).clone()
    # seed + 1 draws the same rows as Faiss' Kmeans(seed=seed) (the engine vqlib used before; both shuffle with
    # the Mersenne Twister), so codebooks made by earlier versions are reproduced.
    gen = torch.Generator().manual_seed(seed + 1)
    return x[torch.randperm(x.shape[0], generator=gen)[:num_clusters].to(x.device)].clone()


def _checked(x: Tensor, num_clusters: int, weights: Tensor | None) -> tuple[int, Tensor]:
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-d tensor (n, d), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if num_clusters < 1:
        raise ValueError(f"kmeans: num_clusters must be >= 1, got {num_clusters}")
    if n < num_clusters:
        raise ValueError(
            f"kmeans: need at least as many vectors as clusters, got {n} vectors for {num_clusters} clusters"
        )
    if weights is None:
        return n, torch.ones(n, device=x.device)
    if weights.shape != (n,):
        raise ValueError(f"kmeans: weights must have shape ({n},), got {tuple(weights.shape)}")
    if not bool((weights >= 0).all()):
        raise ValueError("kmeans: weights must be non-negative")
    return n, weights.detach().float().to(x.device)


def _sums(weighted: Tensor, assign: Tensor, k: int) -> Tensor:
    """(k, d + 1) float64: per centroid, the sums of ``weighted`` (n, d + 1: vector times weight, then
    the weight) over its vectors. One bincount over (vector, column) pairs: faster than index_add_ on CPU."""
    width = weighted.shape[1]
    slots = (assign[:, None] * width + torch.arange(width, device=weighted.device)).reshape(-1)
    return torch.bincount(slots, weights=weighted.reshape(-1), minlength=k * width).reshape(k, width)


def _update(x: Tensor, w: Tensor, acc: Tensor, assign: Tensor, centroids: Tensor, spherical: bool) -> Tensor:
    """Weighted means of the assigned vectors (``acc``: ``_sums``); empty clusters take the
    worst-represented vectors."""
    k, d = centroids.shape
    sums, mass = acc[:, :d], acc[:, d]
    used = mass > 0
    new = centroids.clone()
    new[used] = (sums[used] / mass[used, None]).float()
    empty = (~used).nonzero()[:, 0]
    if empty.numel():
        err = ((x - centroids[assign]) ** 2).sum(1) * w  # (n,) weighted error under the old centroids
        new[empty] = x[err.topk(empty.numel()).indices]
    if spherical:
        new = torch.nn.functional.normalize(new, dim=-1)
    return new
