"""Fused nearest-centroid search and weighted Lloyd sums for low-dimensional vectors on CPU.

Compressing a language model runs thousands of small k-means (one per 128-column group of every
layer: ~50,000 4-dim vectors, 256 centroids) and a GPTQ loop that searches 256 codes for every
row of every vector. For d = 4 a GEMM-based search (Faiss', torch's) is bound by writing and
re-reading the n x k distance matrix; the fused loop (``lloyd_numba``) keeps a tile of points in
registers, scans the centroids once per tile and never stores a distance. One call also returns the
weighted sums of the assigned vectors, so a Lloyd iteration is one pass over the data.

Exact: the nearest centroid under ||x - c||^2 in float32 (the first one on ties); the GEMM backends
compute ||c||^2 - 2 x.c, so near-ties may round the other way. Deterministic: points are cut into fixed chunks with
their own float64 sums, added in chunk order, whatever the thread count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .numba_loops import load_loops

# Measured on 2 cores (benchmarks/bench_search.py --lloyd, docs/llm.md): the fused step is 1.4-2.4x faster
# than Faiss' search + a bincount update for d <= 8 and 256 centroids; at d = 16 they are about even (1.1x)
# and at 4,096 centroids Faiss' GEMM is 2x faster.
LLOYD_MAX_DIM = 8
LLOYD_MAX_CODES = 1024
CHUNK_POINTS = 2048  # points per work item

_FALLBACK = (
    "nearest-code search and k-means on CPU use Faiss' exact search instead (slower for low-dimensional vectors)"
)


def _load():
    """The numba loops (compiled on first use, then from numba's cache), or None after one warning."""
    return load_loops("vqlib.core.lloyd_numba", _warm_up, _FALLBACK)


def _warm_up(mod) -> None:
    _run(mod, np.zeros((3, 4), np.float32), np.ones(3, np.float32), np.eye(2, 4, dtype=np.float32), True, 1)


def fused_lloyd_applies(x: Tensor, codes: Tensor) -> bool:
    """Whether ``lloyd_step`` is the faster Lloyd step here: CPU tensors, d <= LLOYD_MAX_DIM, k <=
    LLOYD_MAX_CODES, and the loops compiled (if they cannot, one warning says so)."""
    if x.device.type != "cpu" or codes.device.type != "cpu":
        return False
    if x.shape[1] > LLOYD_MAX_DIM or codes.shape[0] > LLOYD_MAX_CODES:
        return False
    return _load() is not None


def lloyd_step(x: Tensor, centroids: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Nearest centroid of each row of ``x`` (n, d) among ``centroids`` (k, d), int64 (n,); with
    ``weights`` (n,) also the float64 (k, d + 1) sums of weight x vector and of weight per centroid.

    Call only where ``fused_lloyd_applies`` said yes."""
    xs = np.ascontiguousarray(x.detach().float().cpu().numpy())
    cs = np.ascontiguousarray(centroids.detach().float().cpu().numpy())
    w = None if weights is None else np.ascontiguousarray(weights.detach().float().cpu().numpy())
    assign, acc = _run(_load(), xs, w, cs, weights is not None, max(1, torch.get_num_threads()))
    sums = None if acc is None else torch.from_numpy(acc.sum(0)).to(x.device)
    return torch.from_numpy(assign).to(x.device), sums


def _run(mod, x: np.ndarray, w: np.ndarray | None, centroids: np.ndarray, with_sums: bool, n_threads: int):
    from vqlib.kernels.cpu_threads import job_args, run_job  # lazy: vqlib.kernels imports vqlib.compress

    n, d = x.shape
    k = centroids.shape[0]
    ct = np.ascontiguousarray(centroids.T)  # (d, k)
    chunks = max(1, -(-n // CHUNK_POINTS))
    assign = np.empty(n, np.int64)
    acc = np.zeros((chunks if with_sums else 1, k, d + 1), np.float64)
    w = np.zeros(1, np.float32) if w is None else w
    fields = {mod.A_X: x.ctypes.data, mod.A_W: w.ctypes.data, mod.A_CT: ct.ctypes.data}
    fields |= {mod.A_ASSIGN: assign.ctypes.data, mod.A_ACC: acc.ctypes.data}
    fields |= {mod.A_N: n, mod.A_D: d, mod.A_K: k, mod.A_CHUNKS: chunks, mod.A_WITH_SUMS: int(with_sums)}
    args = job_args(mod.JOB_ARGS, fields)
    run_job(mod.lloyd_job, mod.lloyd_job_c, args, min(n_threads, chunks))
    return assign, (acc if with_sums else None)
