"""Numba loops behind the ``cpu_scalar`` ScalarLinear kernel (see ``cpu_scalar``).

``qweight`` is the layer's little-endian bit stream of ``bits``-bit levels of the (out, in) matrix in
row-major order; ``scales`` (out, n_groups) float32 and ``zeros`` (out, n_groups) float32 give
``w = scale * (q - zero)`` per group of ``group_size`` input columns.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

from .numba_threads import address_to_pointer as ptr
from .numba_threads import next_rows, work_counter


@njit(nogil=True, fastmath=True, inline="always")
def _unpack_aligned(qweight, start, n, per_byte, bits, mask, lv):
    """lv[:n] = levels starting at byte ``start`` when 8 is a multiple of ``bits`` (no straddling)."""
    u = np.uint64
    for i in range(u(n)):
        byte = qweight[u(start) + i // u(per_byte)]
        lv[i] = np.float32((byte >> ((i % u(per_byte)) * u(bits))) & mask)


@njit(nogil=True, fastmath=True, cache=True)
def unpack_row(qweight, bits, in_features, o, lv):
    """lv[:in] = float levels of row o. Rows start on a byte when in * bits is a multiple of 8 and
    bits divides 8 (the fast loops, specialised per bits); otherwise a two-byte window per level."""
    mask = (1 << bits) - 1
    bitpos = o * in_features * bits
    if bitpos % 8 == 0 and bits == 4:
        _unpack_aligned(qweight, bitpos // 8, in_features, 2, 4, 15, lv)
    elif bitpos % 8 == 0 and bits == 2:
        _unpack_aligned(qweight, bitpos // 8, in_features, 4, 2, 3, lv)
    elif bitpos % 8 == 0 and bits == 8:
        _unpack_aligned(qweight, bitpos // 8, in_features, 1, 8, 255, lv)
    else:
        n_bytes = qweight.size
        for k in range(in_features):
            pos = bitpos + k * bits
            byte = pos >> 3
            window = np.int64(qweight[byte])
            if byte + 1 < n_bytes:
                window |= np.int64(qweight[byte + 1]) << 8
            lv[k] = np.float32((window >> (pos & 7)) & mask)


@njit(nogil=True, fastmath=True, cache=True)
def dequant_rows(qweight, bits, in_features, scales, zeros, group_size, r0, r1, w):
    """w[r - r0, :in] = scale * (level - zero) of row r, for r in [r0, r1)."""
    n_groups = scales.shape[1]
    for r in range(r0, r1):
        row = w[r - r0]
        unpack_row(qweight, bits, in_features, r, row)
        for g in range(n_groups):
            k0, k1 = g * group_size, min(in_features, (g + 1) * group_size)
            sc, z = scales[r, g], zeros[r, g]
            for k in range(k0, k1):
                row[k] = sc * (row[k] - z)


@njit(nogil=True, fastmath=True, cache=True)
def gemv_rows(x, xsum, qweight, bits, in_features, scales, zeros, group_size, o0, o1, out, lv):
    """out[t, o] += sum_g scale[o, g] * (<levels_g, x_g> - zero[o, g] * sum(x_g)) for o in [o0, o1).

    Levels are unpacked into the L1 buffer ``lv`` one row at a time and dotted with each token
    as integers-in-float (exact); ``xsum`` (b, n_groups) holds the per-group input sums.
    """
    n_tok = x.shape[0]
    n_groups = scales.shape[1]
    for o in range(o0, o1):
        unpack_row(qweight, bits, in_features, o, lv)
        for t in range(n_tok):
            total = np.float32(0.0)
            for g in range(n_groups):
                k0, k1 = g * group_size, min(in_features, (g + 1) * group_size)
                acc = np.float32(0.0)
                for k in range(k0, k1):  # vectorized dot
                    acc += lv[k] * x[t, k]
                total += scales[o, g] * (acc - zeros[o, g] * xsum[t, g])
            out[t, o] += total


# ---- Jobs (see numba_threads): every thread takes items of ``rows_per_item`` rows off a counter ----
# The array has one more int64 after the fields: the work counter (zero when the call starts).
S_X, S_XSUM, S_QWEIGHT, S_SCALES, S_ZEROS, S_OUT = range(6)  # addresses
S_B, S_N_IN, S_N_OUT, S_QW_N, S_N_GROUPS, S_BITS, S_GS, S_BASE, S_COUNT, S_ROWS_PER_ITEM = range(6, 16)
SCALAR_ARGS = 16


@njit(nogil=True, fastmath=True, cache=True)
def scalar_job(a):
    """GEMV (``out`` is (b, out)) when ``xsum`` is set, else dequantization of rows [base, base + count)
    into ``out`` (count, in). Each row is computed whole by one thread: thread-count independent."""
    b, n_in, n_out, n_groups = a[S_B], a[S_N_IN], a[S_N_OUT], a[S_N_GROUPS]
    bits, gs, base, count, step = a[S_BITS], a[S_GS], a[S_BASE], a[S_COUNT], a[S_ROWS_PER_ITEM]
    qweight = carray(ptr(a[S_QWEIGHT]), (a[S_QW_N],), np.uint8)
    scales = carray(ptr(a[S_SCALES]), (n_out, n_groups), np.float32)
    zeros = carray(ptr(a[S_ZEROS]), (n_out, n_groups), np.float32)
    gemv = a[S_XSUM] != 0
    lv = np.empty(n_in, np.float32)
    counter = work_counter(a)
    while True:
        r0, r1 = next_rows(counter, step, count)
        if r0 >= count:
            return
        if gemv:
            x = carray(ptr(a[S_X]), (b, n_in), np.float32)
            xsum = carray(ptr(a[S_XSUM]), (b, n_groups), np.float32)
            out = carray(ptr(a[S_OUT]), (b, n_out), np.float32)
            gemv_rows(x, xsum, qweight, bits, n_in, scales, zeros, gs, base + r0, base + r1, out, lv)
        else:
            w = carray(ptr(a[S_OUT]), (count, n_in), np.float32)
            dequant_rows(qweight, bits, n_in, scales, zeros, gs, base + r0, base + r1, w[r0:])


@cfunc(types.void(types.voidptr), cache=True)
def scalar_job_c(data):
    """``scalar_job`` with the C signature of an OpenMP team body."""
    scalar_job(carray(data, (SCALAR_ARGS + 1,), np.int64))
