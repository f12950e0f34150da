"""Numba-compiled loops behind the ``cpu_lut`` VQLinear kernel (see ``cpu_lut`` for the design).

Every function takes contiguous arrays of fixed dtypes so that each compiles once (one signature),
and ``cache=True`` stores the machine code next to this file or, when that folder is read-only,
in ``NUMBA_CACHE_DIR`` / the user's cache folder (numba's own fallback).

Shapes (all flat or 2-D C-contiguous numpy arrays):
- ``x``      (b, in_pad) float32, zero-padded to ``in_pad = n_vec * d``
- ``codes``  (out, nq) uint8 with ``nq = n_vec * M``: code ``q = j * M + m`` of row ``o``
- ``blocked`` (ceil(nq / 16), out, 2) uint64: the same codes block-major, zero-padded, 16 per
  row and block packed into two little-endian words
- ``cbt``    (G * M, d, 256) float32, codebook scales folded in, transposed for the table build
- ``cbf``    (G * M, 256, d) float32, the same entries laid out for dequantization
- ``qcb``    (nq,) int32: codebook (``g(j) * M + m``) of code position ``q``
- ``scales`` (out, S) float32 (ones when the layer has none); ``sgq``: code positions per scale
  group (``nq`` for row scales, so the scale index is always 0); ``svec`` (n_vec,) int64: the
  scale column of each vector
- ``out``    (b, out) float32

The ``*_job`` functions run on every thread of a team (``cpu_threads.run_job``); the rest is serial.
Everything releases the GIL.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

from .numba_threads import address_to_pointer as ptr
from .numba_threads import fetch_add, next_rows, work_counter

# No 'reassoc': the explicit add tree in _row16 keeps four independent chains (the default fastmath
# folds them back into one serial chain of 16 dependent adds).
FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}
QB = 16  # code positions per table block: 16 x 256 fp32 = 16 KiB, half of Zen3's 32 KiB L1d
ENTRIES = 256  # 2**B for B = 8


@njit(nogil=True, fastmath=True, cache=True)
def fill_table(x_row, cbt, qcb, q0, nq_blk, m_books, d, table):
    """table[qq, k] = <x slice of vector j(q0+qq), codebook qcb[q0+qq] entry k>  # (nq_blk, 256)

    One expression per entry for the common d (2, 4, 8) so LLVM vectorizes over the 256 entries
    with a single store; other d accumulate in place.
    """
    for qq in range(nq_blk):
        q = q0 + qq
        j = q // m_books
        xs = x_row[j * d : (j + 1) * d]
        cb = cbt[qcb[q] * d * ENTRIES : (qcb[q] + 1) * d * ENTRIES]
        row = table[qq * ENTRIES : (qq + 1) * ENTRIES]
        if d == 4:
            x0, x1, x2, x3 = xs[0], xs[1], xs[2], xs[3]
            for k in range(ENTRIES):
                row[k] = x0 * cb[k] + x1 * cb[256 + k] + x2 * cb[512 + k] + x3 * cb[768 + k]
        elif d == 2:
            x0, x1 = xs[0], xs[1]
            for k in range(ENTRIES):
                row[k] = x0 * cb[k] + x1 * cb[256 + k]
        elif d == 8:
            x0, x1, x2, x3, x4, x5, x6, x7 = xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]
            for k in range(ENTRIES):
                row[k] = (x0 * cb[k] + x1 * cb[256 + k] + x2 * cb[512 + k] + x3 * cb[768 + k]) + (
                    x4 * cb[1024 + k] + x5 * cb[1280 + k] + x6 * cb[1536 + k] + x7 * cb[1792 + k]
                )
        else:
            row[:] = 0.0
            for i in range(d):
                for k in range(ENTRIES):
                    row[k] += xs[i] * cb[i * ENTRIES + k]


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def _row16(words, p, table):
    """Sum of 16 table lookups for the 16 codes packed in words[p], words[p + 1] (little-endian).

    One 8-byte load per 8 codes and shifts to extract them measured ~10% faster than 16 byte
    loads (the loads compete with the table reads); four independent add chains.
    """
    u = np.uint64
    m = u(255)
    c = words[p]
    e = words[p + u(1)]
    a0 = table[c & m] + table[u(256) + ((c >> u(8)) & m)]
    a1 = table[u(512) + ((c >> u(16)) & m)] + table[u(768) + ((c >> u(24)) & m)]
    a2 = table[u(1024) + ((c >> u(32)) & m)] + table[u(1280) + ((c >> u(40)) & m)]
    a3 = table[u(1536) + ((c >> u(48)) & m)] + table[u(1792) + (c >> u(56))]
    a0 += table[u(2048) + (e & m)] + table[u(2304) + ((e >> u(8)) & m)]
    a1 += table[u(2560) + ((e >> u(16)) & m)] + table[u(2816) + ((e >> u(24)) & m)]
    a2 += table[u(3072) + ((e >> u(32)) & m)] + table[u(3328) + ((e >> u(40)) & m)]
    a3 += table[u(3584) + ((e >> u(48)) & m)] + table[u(3840) + (e >> u(56))]
    return (a0 + a1) + (a2 + a3)


@njit(nogil=True, fastmath=True, inline="always")
def _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, n, two):
    """Vectors j0..j1-1 of one row for M = 1 or 2 (``two``) and a constant d = ``n`` (unrolled)."""
    u = np.uint64
    mb = u(2) if two else u(1)
    off = u(0)
    for j in range(u(j0), u(j1)):
        q = j * mb
        sc = srow[svec[j]]
        e = (u(qcb[q]) * u(ENTRIES) + u(codes[row + q])) * u(n)
        if two:
            e2 = (u(qcb[q + u(1)]) * u(ENTRIES) + u(codes[row + q + u(1)])) * u(n)
            for i in range(n):
                w[off + u(i)] = (cbf[e + u(i)] + cbf[e2 + u(i)]) * sc
        else:
            for i in range(n):
                w[off + u(i)] = cbf[e + u(i)] * sc
        off += u(n)


@njit(nogil=True, fastmath=True, cache=True)
def dequant_seg(codes, o, j0, j1, cbf, qcb, m_books, d, scales, svec, w):
    """w[: (j1 - j0) * d] = vectors j0..j1-1 of row o of the padded weight (scale included).

    ``codes`` is the flat (out * nq,) array, ``svec`` (n_vec,) the scale column of each vector.
    M in (1, 2) with d in (2, 4, 8) run a loop specialised at compile time (constant trip counts:
    a runtime d costs a vector prologue per vector, about 3x slower); other shapes take the generic
    loop. Indices are unsigned so numba adds no negative-index branches.
    """
    u = np.uint64
    nq = u(codes.size // scales.shape[0])
    row = u(o) * nq
    srow = scales[o]
    if m_books == 1 and d == 4:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 4, False)
    elif m_books == 1 and d == 8:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 8, False)
    elif m_books == 1 and d == 2:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 2, False)
    elif m_books == 2 and d == 8:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 8, True)
    elif m_books == 2 and d == 4:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 4, True)
    elif m_books == 2 and d == 2:
        _seg_loop(codes, row, j0, j1, cbf, qcb, srow, svec, w, 2, True)
    else:
        mb, dd = u(m_books), u(d)
        off = u(0)
        for j in range(u(j0), u(j1)):
            for i in range(dd):
                w[off + i] = 0.0
            for m in range(mb):
                e = (u(qcb[j * mb + m]) * u(ENTRIES) + u(codes[row + j * mb + m])) * dd
                for i in range(dd):
                    w[off + i] += cbf[e + i]
            sc = srow[svec[j]]
            for i in range(dd):
                w[off + i] *= sc
            off += dd


@njit(nogil=True, fastmath=True, cache=True)
def dequant_rows(codes, cbf, qcb, m_books, d, scales, svec, n_vec, r0, r1, w):
    """w[r - r0, :] = dequantized padded row r for r in [r0, r1)  # w: (>= r1 - r0, n_vec * d)"""
    for r in range(r0, r1):
        dequant_seg(codes, r, 0, n_vec, cbf, qcb, m_books, d, scales, svec, w[r - r0])


# ---- Jobs: every thread of a team runs the same job on one packed int64 ``args`` array ----------
# (see numba_threads). Field positions of the LUT job's args:
# The array has one more int64 after the fields: the work counter (zero when the call starts).
L_X, L_BLOCKED, L_CBT, L_QCB, L_SCALES, L_ACC = range(6)  # addresses
L_B, L_IN_PAD, L_N_BLK, L_N_OUT, L_NQ, L_CBT_N, L_S_COLS, L_M, L_D, L_SGQ, L_N_CHUNKS = range(6, 17)
LUT_ARGS = 17


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def lut_block(x, blocked, blk, nq, cbt, qcb, m_books, d, scales, sgq, out, table):
    """out[t, :] += scaled sums of the lookups of table block ``blk`` for every token t and row."""
    u = np.uint64
    n_out = blocked.shape[1]
    flat = blocked.reshape(-1)  # (n_blk * out * 2,) uint64: 8 codes per word
    sflat = scales.reshape(-1)
    n_s = u(scales.shape[1])
    s = u(blk * QB // sgq)
    n_pos = min(QB, nq - blk * QB)
    for t in range(x.shape[0]):
        fill_table(x[t], cbt, qcb, blk * QB, n_pos, m_books, d, table)
        if n_pos < QB:
            table[n_pos * ENTRIES :] = 0.0  # padded positions (code 0) add nothing
        out_t = out[t]
        p = u(blk * n_out * 2)
        for o in range(u(0), u(n_out)):  # unsigned: no negative-index branches per row
            out_t[o] += _row16(flat, p, table) * sflat[o * n_s + s]
            p += u(2)


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def lut_job(a):
    """Take chunks of table blocks off the shared counter until none is left.

    Chunk ``c`` (blocks ``[c * n_blk // n_chunks, (c + 1) * n_blk // n_chunks)``, all rows) adds into its
    own accumulator ``acc[c]`` (n_chunks, b, out); the caller sums them in chunk order, so the result
    does not depend on the number of threads or on which thread took which chunk. Splitting the code
    positions rather than the rows builds each table once, whatever the thread count.
    """
    b, in_pad, n_blk, n_out, nq = a[L_B], a[L_IN_PAD], a[L_N_BLK], a[L_N_OUT], a[L_NQ]
    n_chunks = a[L_N_CHUNKS]
    x = carray(ptr(a[L_X]), (b, in_pad), np.float32)
    blocked = carray(ptr(a[L_BLOCKED]), (n_blk, n_out, 2), np.uint64)
    cbt = carray(ptr(a[L_CBT]), (a[L_CBT_N],), np.float32)
    qcb = carray(ptr(a[L_QCB]), (nq,), np.int32)
    scales = carray(ptr(a[L_SCALES]), (n_out, a[L_S_COLS]), np.float32)
    acc = carray(ptr(a[L_ACC]), (n_chunks, b, n_out), np.float32)
    table = np.empty(QB * ENTRIES, np.float32)
    counter = work_counter(a)
    while True:
        c = fetch_add(counter, 1)
        if c >= n_chunks:
            return
        acc[c][:] = 0.0
        for blk in range(c * n_blk // n_chunks, (c + 1) * n_blk // n_chunks):
            lut_block(x, blocked, blk, nq, cbt, qcb, a[L_M], a[L_D], scales, a[L_SGQ], acc[c], table)


@cfunc(types.void(types.voidptr), cache=True)
def lut_job_c(data):
    """``lut_job`` with the C signature OpenMP's ``GOMP_parallel`` calls on every thread of its team."""
    lut_job(carray(data, (LUT_ARGS + 1,), np.int64))


# Field positions of the dequantization job's args (rows [base, base + count) into w[0:count]):
D_CODES, D_CBF, D_QCB, D_SCALES, D_SVEC, D_W = range(6)  # addresses; then the counter, as above
D_N_OUT, D_NQ, D_CBF_N, D_S_COLS, D_N_VEC, D_M, D_D, D_BASE, D_COUNT, D_ROWS_PER_ITEM = range(6, 16)
DEQUANT_ARGS = 16


@njit(nogil=True, fastmath=True, cache=True)
def dequant_job(a):
    """Take items of ``rows_per_item`` rows off the shared counter and dequantize them into ``w``."""
    n_out, nq, n_vec, d = a[D_N_OUT], a[D_NQ], a[D_N_VEC], a[D_D]
    codes = carray(ptr(a[D_CODES]), (n_out * nq,), np.uint8)
    cbf = carray(ptr(a[D_CBF]), (a[D_CBF_N],), np.float32)
    qcb = carray(ptr(a[D_QCB]), (nq,), np.int32)
    scales = carray(ptr(a[D_SCALES]), (n_out, a[D_S_COLS]), np.float32)
    svec = carray(ptr(a[D_SVEC]), (n_vec,), np.int64)
    w = carray(ptr(a[D_W]), (a[D_COUNT], n_vec * d), np.float32)
    base, count, step = a[D_BASE], a[D_COUNT], a[D_ROWS_PER_ITEM]
    counter = work_counter(a)
    while True:
        r0, r1 = next_rows(counter, step, count)
        if r0 >= count:
            return
        dequant_rows(codes, cbf, qcb, a[D_M], d, scales, svec, n_vec, base + r0, base + r1, w[r0:])


@cfunc(types.void(types.voidptr), cache=True)
def dequant_job_c(data):
    """``dequant_job`` with the C signature of an OpenMP team body."""
    dequant_job(carray(data, (DEQUANT_ARGS + 1,), np.int64))
