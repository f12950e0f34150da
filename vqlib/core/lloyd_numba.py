"""Numba loops behind ``vqlib.core.lloyd``: nearest-centroid search fused with the weighted sums of a
Lloyd step, for low-dimensional vectors (d <= 16) on CPU.

Shapes (C-contiguous numpy arrays):
- ``x``      (n, d) float32, ``w`` (n,) float32 (ignored when ``acc`` is empty)
- ``ct``     (d, k) float32: the centroids, transposed
- ``assign`` (n,) int64: out, the index of the nearest centroid (the first one on ties)
- ``acc``    (n_chunks, k, d + 1) float64: out, per chunk of points the weighted sums of the
  assigned vectors and the weights; shape (0, 0, 0) to skip

Per point: the k squared distances in one loop over the centroids (vectorized; the dimension is a
compile-time constant for d in (2, 4, 8)), then the smallest and the first index holding it as two
branch-free int32 reductions (both vectorized). No distance matrix is ever stored.
The ``*_job`` functions run on every thread of a team (``vqlib.kernels.cpu_threads.run_job``).
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

from vqlib.kernels.numba_threads import address_to_pointer as ptr
from vqlib.kernels.numba_threads import fetch_add, work_counter

FASTMATH = True  # min reductions need reassociation to vectorize (exact for min; the distances may round differently)


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def _distances(xp, ct, dist, n_dim):
    """dist[j] = ||x - c_j||^2 for all k centroids (squared differences: never negative, see
    ``_first_min``); ``n_dim`` is a literal at each call site."""
    u = np.uint64
    k = u(dist.shape[0])
    if n_dim == 2:
        x0, x1 = xp[0], xp[1]
        for j in range(u(0), k):
            e0, e1 = x0 - ct[0, j], x1 - ct[1, j]
            dist[j] = e0 * e0 + e1 * e1
    elif n_dim == 4:
        x0, x1, x2, x3 = xp[0], xp[1], xp[2], xp[3]
        for j in range(u(0), k):
            e0, e1, e2, e3 = x0 - ct[0, j], x1 - ct[1, j], x2 - ct[2, j], x3 - ct[3, j]
            dist[j] = (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)
    elif n_dim == 8:
        x0, x1, x2, x3, x4, x5, x6, x7 = xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6], xp[7]
        for j in range(u(0), k):
            e0, e1, e2, e3 = x0 - ct[0, j], x1 - ct[1, j], x2 - ct[2, j], x3 - ct[3, j]
            e4, e5, e6, e7 = x4 - ct[4, j], x5 - ct[5, j], x6 - ct[6, j], x7 - ct[7, j]
            dist[j] = ((e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3)) + ((e4 * e4 + e5 * e5) + (e6 * e6 + e7 * e7))
    else:
        dist[:] = 0.0
        for i in range(u(0), u(xp.shape[0])):
            xi = xp[i]
            for j in range(u(0), k):
                e = xi - ct[i, j]
                dist[j] += e * e


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def _first_min(bits):
    """Index of the smallest distance (the first on ties), given the distances' bits as int32.

    Non-negative float32 values order exactly like their bit patterns read as int32, and int32 min
    reductions vectorize (float min reductions do not, under numba's per-instruction fast-math
    flags); unsigned loop indices spare the negative-index branches that would stop the vectorizer."""
    u = np.uint64
    k = u(bits.shape[0])
    m = bits[0]
    for j in range(u(0), k):
        v = bits[j]
        m = v if v < m else m
    first = np.int32(k)
    for j in range(u(0), k):
        c = np.int32(j) if bits[j] == m else np.int32(k)
        first = c if c < first else first
    return first


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def assign_range(x, w, ct, p0, p1, assign, acc_chunk, with_sums):
    """Nearest centroids of points [p0, p1); with ``with_sums`` also add them into ``acc_chunk`` (k, d + 1)."""
    d = x.shape[1]
    dist = np.empty(ct.shape[1], np.float32)
    bits = dist.view(np.int32)
    for p in range(p0, p1):
        xp = x[p]
        if d == 2:
            _distances(xp, ct, dist, 2)
        elif d == 4:
            _distances(xp, ct, dist, 4)
        elif d == 8:
            _distances(xp, ct, dist, 8)
        else:
            _distances(xp, ct, dist, 0)
        a = _first_min(bits)
        assign[p] = a
        if with_sums:  # float32 products, float64 sums: as vqlib.core.kmeans' bincount update
            wp = w[p]
            for i in range(d):
                acc_chunk[a, i] += np.float64(xp[i] * wp)
            acc_chunk[a, d] += np.float64(wp)


# Job argument fields (addresses, then sizes); one more int64 after them is the work counter.
A_X, A_W, A_CT, A_ASSIGN, A_ACC = range(5)
A_N, A_D, A_K, A_CHUNKS, A_WITH_SUMS = range(5, 10)
JOB_ARGS = 10


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def lloyd_job(a):
    """Take chunks of points off the shared counter; chunk c covers [c * n // chunks, (c + 1) * n // chunks)."""
    n, d, k, chunks, with_sums = a[A_N], a[A_D], a[A_K], a[A_CHUNKS], a[A_WITH_SUMS]
    x = carray(ptr(a[A_X]), (n, d), np.float32)
    w = carray(ptr(a[A_W]), (n,), np.float32)
    ct = carray(ptr(a[A_CT]), (d, k), np.float32)
    assign = carray(ptr(a[A_ASSIGN]), (n,), np.int64)
    acc = carray(ptr(a[A_ACC]), (chunks if with_sums else 1, k, d + 1), np.float64)
    counter = work_counter(a)
    while True:
        c = fetch_add(counter, 1)
        if c >= chunks:
            return
        acc_chunk = acc[c if with_sums else 0]
        assign_range(x, w, ct, c * n // chunks, (c + 1) * n // chunks, assign, acc_chunk, with_sums != 0)


@cfunc(types.void(types.voidptr), cache=True)
def lloyd_job_c(data):
    """``lloyd_job`` with the C signature of an OpenMP team body."""
    lloyd_job(carray(data, (JOB_ARGS + 1,), np.int64))
