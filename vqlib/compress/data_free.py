"""Data-free VQ: (weighted, residual) k-means on the scale-normalised weight vectors of a layer."""

from __future__ import annotations

import torch
from torch import Tensor

from vqlib.core.seeds import derive_seed

from .codebooks import VQParts, column_scales, fit_additive_codebooks, rms_scales, round_codebook
from .config import VQConfig
from .format import vector_group_index


def pad_columns(weight: Tensor, vector_dim: int) -> Tensor:
    """Zero-pad the input dim to a multiple of ``vector_dim`` (the documented pad rule)."""
    pad = (-weight.shape[1]) % vector_dim
    return torch.nn.functional.pad(weight, (0, pad)) if pad else weight


def group_vector_ranges(num_vectors: int, cfg: VQConfig) -> list[tuple[int, int]]:
    """[start, end) vector index ranges of the codebook groups."""
    groups = vector_group_index(num_vectors, cfg.vector_dim, cfg.group_size)
    n_groups = int(groups[-1]) + 1
    per = num_vectors if cfg.group_size is None else cfg.group_size // cfg.vector_dim
    return [(g * per, min(num_vectors, (g + 1) * per)) for g in range(n_groups)]


def fit_group(
    vectors: Tensor, weights: Tensor | None, cfg: VQConfig, seed: int, init: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Codebooks (M, K, d) and codes (n, M) of one group; ``init`` (M, K, d), e.g. the previous group's
    codebooks, warm-starts k-means for ``cfg.kmeans_warm_iters`` iterations instead of ``cfg.kmeans_iters``."""
    return fit_additive_codebooks(
        vectors,
        weights,
        num_codebooks=cfg.num_codebooks,
        codebook_size=cfg.codebook_size,
        codebook_dtype=cfg.codebook_dtype,
        kmeans_iters=cfg.kmeans_iters if init is None else cfg.kmeans_warm_iters,
        init=init,
        points_per_centroid=cfg.kmeans_points_per_centroid,
        refine_passes=cfg.refine_passes,
        seed=seed,
    )


def quantize_data_free(weight: Tensor, cfg: VQConfig, seed: int) -> VQParts:
    """VQ of a float32 (out, in) weight without data.

    Each row (or row group) is divided by its RMS scale, then every codebook group is clustered
    with residual k-means; vectors are weighted by their squared scale so that the clustering
    minimises the error of the de-normalised weight.
    """
    out_features, _ = weight.shape
    d = cfg.vector_dim
    scales = rms_scales(weight, cfg.scale_granularity, cfg.scale_group_size)
    padded = pad_columns(weight, d)
    n_vec = padded.shape[1] // d
    col_scale = column_scales(scales, padded.shape[1], cfg.scale_group_size)
    normalized = padded if col_scale is None else padded / col_scale
    vectors = normalized.reshape(out_features, n_vec, d)
    vec_weight = None if col_scale is None else col_scale[:, ::d] ** 2  # (out, n_vec)
    ranges = group_vector_ranges(n_vec, cfg)
    codebooks = torch.empty(len(ranges), cfg.num_codebooks, cfg.codebook_size, d, device=weight.device)
    codes = torch.empty(out_features, n_vec, cfg.num_codebooks, dtype=torch.long, device=weight.device)
    for g, (start, end) in enumerate(ranges):
        v = vectors[:, start:end].reshape(-1, d)
        w = None if vec_weight is None else vec_weight[:, start:end].reshape(-1)
        cb, c = fit_group(v, w, cfg, derive_seed(seed, "codebook_group", g))
        codebooks[g] = cb
        codes[:, start:end] = c.reshape(out_features, end - start, cfg.num_codebooks)
    values, cb_scales = round_codebook(codebooks, cfg.codebook_dtype)
    return VQParts(codes, values, cb_scales, scales)
