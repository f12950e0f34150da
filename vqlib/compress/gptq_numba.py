"""Numba loop behind ``gptq_loop``: the GPTQ column loop of one lazy-update block for one codebook (M = 1).

Rows are independent in GPTQ (the error of a vector only moves along its own row), so each thread
takes items of rows and runs the whole block for them: per row and vector, map the vector by
U_jj^-1, pick the nearest transformed codebook entry, and spread the mapped error over the row's
later columns of the block. Done in torch this is ~20 small ops per vector, whose dispatch costs
more than their arithmetic (docs/llm.md, "Compression time").

Shapes (C-contiguous numpy arrays), nb vectors of d columns in the block, K codebook entries:
- ``block``  (out, nb * d) float32, in/out: the weights being corrected
- ``errors`` (out, nb * d) float32, out: the mapped errors (for the lazy update of later blocks)
- ``codes``  (out, nb) int64, out
- ``cbt``    (nb, d, K) float32: per vector its codebook mapped by U_jj^-1, transposed
- ``cb``     (nb, K, d) float32: per vector its codebook
- ``t``      (nb, d, d) float32: U_jj^-1
- ``s``      (out, nb) float32: the vectors' scales
- ``u``      (nb * d, nb * d) float32: the block's part of U
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

from vqlib.core.lloyd_numba import _distances, _first_min
from vqlib.kernels.numba_threads import address_to_pointer as ptr
from vqlib.kernels.numba_threads import next_rows, work_counter


@njit(nogil=True, fastmath=True, inline="always")
def _map(v, t, out):
    """out = v @ t for a (d,) vector and a (d, d) matrix."""
    d = v.shape[0]
    for i2 in range(d):
        acc = np.float32(0.0)
        for i1 in range(d):
            acc += v[i1] * t[i1, i2]
        out[i2] = acc


@njit(nogil=True, fastmath=True, cache=True)
def gptq_rows(block, errors, codes, cbt, cb, t, s, u, r0, r1):
    """The block's column loop for rows [r0, r1)."""
    nb, d, k = cbt.shape
    width = nb * d
    dist = np.empty(k, np.float32)
    bits = dist.view(np.int32)
    v = np.empty(d, np.float32)
    y = np.empty(d, np.float32)
    for r in range(r0, r1):
        row = block[r]
        for j in range(nb):
            c0 = j * d
            sc = s[r, j]
            for i in range(d):
                v[i] = row[c0 + i] / sc
            _map(v, t[j], y)
            if d == 2:
                _distances(y, cbt[j], dist, 2)
            elif d == 4:
                _distances(y, cbt[j], dist, 4)
            elif d == 8:
                _distances(y, cbt[j], dist, 8)
            else:
                _distances(y, cbt[j], dist, 0)
            code = _first_min(bits)
            codes[r, j] = code
            for i in range(d):
                v[i] = row[c0 + i] - sc * cb[j, code, i]
            _map(v, t[j], y)
            for i in range(d):
                errors[r, c0 + i] = y[i]
                urow = u[c0 + i]
                yi = y[i]
                for c in range(c0 + d, width):
                    row[c] -= yi * urow[c]


# Job argument fields (addresses, then sizes); one more int64 after them is the work counter.
G_BLOCK, G_ERRORS, G_CODES, G_CBT, G_CB, G_T, G_S, G_U = range(8)
G_OUT, G_NB, G_D, G_K, G_ROWS_PER_ITEM = range(8, 13)
JOB_ARGS = 13


@njit(nogil=True, fastmath=True, cache=True)
def gptq_job(a):
    """Take items of rows off the shared counter and run the block's column loop on them."""
    out, nb, d, k = a[G_OUT], a[G_NB], a[G_D], a[G_K]
    block = carray(ptr(a[G_BLOCK]), (out, nb * d), np.float32)
    errors = carray(ptr(a[G_ERRORS]), (out, nb * d), np.float32)
    codes = carray(ptr(a[G_CODES]), (out, nb), np.int64)
    cbt = carray(ptr(a[G_CBT]), (nb, d, k), np.float32)
    cb = carray(ptr(a[G_CB]), (nb, k, d), np.float32)
    t = carray(ptr(a[G_T]), (nb, d, d), np.float32)
    s = carray(ptr(a[G_S]), (out, nb), np.float32)
    u = carray(ptr(a[G_U]), (nb * d, nb * d), np.float32)
    counter = work_counter(a)
    while True:
        r0, r1 = next_rows(counter, a[G_ROWS_PER_ITEM], out)
        if r0 >= out:
            return
        gptq_rows(block, errors, codes, cbt, cb, t, s, u, r0, r1)


@cfunc(types.void(types.voidptr), cache=True)
def gptq_job_c(data):
    """``gptq_job`` with the C signature of an OpenMP team body."""
    gptq_job(carray(data, (JOB_ARGS + 1,), np.int64))
