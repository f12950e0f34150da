"""k-means through Faiss (GPU k-means when a CUDA device and faiss-gpu are present)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vqlib.core.search import faiss_blas_path, faiss_has_gpu


@torch.compiler.disable  # Faiss is C++: under torch.compile it runs eagerly between graphs
def kmeans(
    x: Tensor,
    num_clusters: int,
    *,
    num_iters: int = 20,
    seed: int = 0,
    weights: Tensor | None = None,
    spherical: bool = False,
    use_gpu: bool | None = None,
) -> Tensor:
    """Cluster rows of ``x`` (n, d) into ``num_clusters`` centroids with Faiss.

    Returns the centroids as a float32 tensor (num_clusters, d) on ``x``'s device.
    ``weights`` (n,) weights each vector in the centroid updates (Faiss supports
    weighted k-means natively). Requires ``n >= num_clusters``.
    """
    import faiss

    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-d tensor (n, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    if num_clusters < 1:
        raise ValueError(f"kmeans: num_clusters must be >= 1, got {num_clusters}")
    if n < num_clusters:
        raise ValueError(
            f"kmeans: need at least as many vectors as clusters, got {n} vectors for {num_clusters} clusters"
        )
    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    w = None
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"kmeans: weights must have shape ({n},), got {tuple(weights.shape)}")
        w = np.ascontiguousarray(weights.detach().float().cpu().numpy())
    if use_gpu is None:
        use_gpu = x.is_cuda and faiss_has_gpu()
    km = faiss.Kmeans(
        d,
        num_clusters,
        niter=num_iters,
        seed=seed,
        spherical=spherical,
        gpu=bool(use_gpu),
        verbose=False,
        # Faiss subsamples to max_points_per_centroid * k by default; we pass what we want clustered.
        max_points_per_centroid=max(1, (n + num_clusters - 1) // num_clusters),
        min_points_per_centroid=1,  # few points per centroid is a caller decision, not a warning
    )
    km.train(data, weights=w)
    return torch.from_numpy(km.centroids.copy()).to(x.device)


@torch.compiler.disable
def kmeans_assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Exact nearest-centroid assignment through a Faiss flat index (returns int64 (n,))."""
    import faiss

    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids.detach().float().cpu().numpy()))
    with faiss_blas_path(faiss):
        _, idx = index.search(data, 1)
    return torch.from_numpy(idx[:, 0]).to(x.device)
