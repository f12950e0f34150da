"""Codebook building blocks shared by the VQ algorithms: additive (residual) assignment and k-means
on the shared core search and k-means (``vqlib.core``), storage rounding of codebooks and scales."""

from __future__ import annotations

import torch
from torch import Tensor

from vqlib.core.kmeans import kmeans
from vqlib.core.search import nearest_code


def assign_additive(x: Tensor, codebooks: Tensor, refine_passes: int = 1, init: Tensor | None = None) -> Tensor:
    """Codes (n, M) for additive codebooks (M, K, d) approximating rows of x (n, d).

    Greedy residual assignment, then ``refine_passes`` rounds of re-choosing each codebook's code
    with the others fixed (never increases the error). ``init`` (n, M) skips the greedy pass.
    """
    m = codebooks.shape[0]
    if init is None:
        codes = torch.empty(x.shape[0], m, dtype=torch.long, device=x.device)
        residual = x.clone()
        for i in range(m):
            codes[:, i] = nearest_code(residual, codebooks[i])
            residual -= codebooks[i][codes[:, i]]
    else:
        codes = init.clone()
        residual = x - sum(codebooks[i][codes[:, i]] for i in range(m))
    if m > 1:
        for _ in range(refine_passes):
            for i in range(m):
                residual += codebooks[i][codes[:, i]]
                codes[:, i] = nearest_code(residual, codebooks[i])
                residual -= codebooks[i][codes[:, i]]
    return codes


def round_codebook(codebook: Tensor, codebook_dtype: str) -> tuple[Tensor, Tensor | None]:
    """Round float codebooks (..., K, d) to their stored values.

    Returns (values as float32, stored scale (...) as float32 or None). int8 uses one symmetric
    fp16 scale per codebook.
    """
    if codebook_dtype == "fp16":
        values = codebook.to(torch.float16).float()
        if not torch.isfinite(values).all():
            raise ValueError(
                "codebook values overflow fp16 (|value| > 65504); enable scale normalisation "
                "(scale_granularity='row' or 'group') or use codebook_dtype='int8'"
            )
        return values, None
    amax = codebook.abs().amax(dim=(-1, -2))
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float16).float()
    if not torch.isfinite(scale).all() or (scale == 0).any():
        raise ValueError("int8 codebook scale is outside the fp16 range; enable scale normalisation")
    q = torch.clamp(torch.round(codebook / scale[..., None, None]), -127, 127)
    return q * scale[..., None, None], scale


def fit_additive_codebooks(
    vectors: Tensor,
    weights: Tensor | None,
    *,
    num_codebooks: int,
    codebook_size: int,
    codebook_dtype: str,
    kmeans_iters: int,
    points_per_centroid: int,
    refine_passes: int,
    seed: int,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Residual (weighted) k-means for additive codebooks, rounded to storage values.

    vectors (n, d), weights (n,) or None. Returns (codebooks (M, K, d) float32, codes (n, M)).
    Each codebook is trained on at most ``points_per_centroid * K`` sampled residuals (seeded);
    assignments always use every vector. Refinement passes alternate (weighted) centroid updates
    of one codebook given the others with re-assignment, like k-means on the additive model.
    ``init`` (M, K, d) warm-starts each codebook's k-means.
    """
    n, d = vectors.shape
    if n < codebook_size:
        raise ValueError(f"need at least {codebook_size} vectors for a {codebook_size}-entry codebook, got {n}")
    gen = torch.Generator().manual_seed(seed)
    max_points = points_per_centroid * codebook_size
    sample = None if n <= max_points else torch.randperm(n, generator=gen)[:max_points].to(vectors.device)
    codebooks = torch.empty(num_codebooks, codebook_size, d, device=vectors.device)
    codes = torch.empty(n, num_codebooks, dtype=torch.long, device=vectors.device)
    residual = vectors.clone()
    for i in range(num_codebooks):
        train = residual if sample is None else residual[sample]
        w = None if weights is None else (weights if sample is None else weights[sample])
        start = None if init is None else init[i]
        centroids = kmeans(train, codebook_size, num_iters=kmeans_iters, seed=seed + i, weights=w, init=start)
        centroids = centroids.to(vectors.device)
        codebooks[i] = round_codebook(centroids, codebook_dtype)[0]
        codes[:, i] = nearest_code(residual, codebooks[i])
        residual -= codebooks[i][codes[:, i]]
    if num_codebooks > 1:
        w = torch.ones(n, device=vectors.device) if weights is None else weights.float()
        for _ in range(refine_passes):
            for i in range(num_codebooks):
                residual += codebooks[i][codes[:, i]]
                sums = torch.zeros(codebook_size, d, device=vectors.device).index_add_(
                    0, codes[:, i], residual * w[:, None]
                )
                mass = torch.zeros(codebook_size, device=vectors.device).index_add_(0, codes[:, i], w)
                used = mass > 0
                updated = codebooks[i].clone()
                updated[used] = sums[used] / mass[used, None]
                codebooks[i] = round_codebook(updated, codebook_dtype)[0]
                codes[:, i] = nearest_code(residual, codebooks[i])
                residual -= codebooks[i][codes[:, i]]
    return codebooks, codes


def rms_scales(weight: Tensor, scale_granularity: str, scale_group_size: int) -> Tensor | None:
    """Per-row (out, 1) or per-row-and-group (out, S) fp16-representable RMS scales; None for 'none'."""
    if scale_granularity == "none":
        return None
    out_features, in_features = weight.shape
    group = in_features if scale_granularity == "row" else scale_group_size
    n_groups = -(-in_features // group)
    pad = n_groups * group - in_features
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(out_features, n_groups, group)
    counts = torch.full((n_groups,), float(group), device=weight.device)
    counts[-1] = group - pad
    rms = torch.sqrt((w * w).sum(-1) / counts)
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    scales = rms.to(torch.float16).float()
    if not torch.isfinite(scales).all() or (scales == 0).any():
        raise ValueError("weight scales fall outside the fp16 range (|rms| > 65504 or < 6e-8)")
    return scales


def column_scales(scales: Tensor | None, in_padded: int, scale_group_size: int | None) -> Tensor | None:
    """Expand (out, S) scales to one per weight column (out, in_padded)."""
    if scales is None:
        return None
    if scales.shape[1] == 1:
        return scales.expand(-1, in_padded)
    idx = torch.arange(in_padded, device=scales.device) // scale_group_size
    return scales[:, idx]


class VQParts:
    """What a VQ algorithm produces for one layer (float tensors hold exactly the stored values)."""

    def __init__(self, codes: Tensor, codebooks: Tensor, codebook_scales: Tensor | None, scales: Tensor | None):
        self.codes = codes  # (out, n_vec, M) int64
        self.codebooks = codebooks  # (G, M, K, d) float32
        self.codebook_scales = codebook_scales  # (G, M) float32 (int8 codebooks) or None
        self.scales = scales  # (out, S) float32 or None
