"""Numba loops behind the ``cpu_lut_avx512`` VQLinear kernel (see ``cpu_lut_avx512`` for the design).

Import this module only on a CPU (or numba target) with AVX-512F and AVX-512BW: ``lut_tile`` calls the
``vpermi2w`` intrinsic, which LLVM cannot lower for other targets (``cpu_lut_avx512.isa_missing``).

Shapes (C-contiguous numpy arrays), in addition to those of ``cpu_vq_numba``:
- ``tiles``    (n_blk, n_rt, 16 * 128) uint8: the codes of table block ``blk`` (16 code positions) and row
  tile ``rt`` (128 rows), position-major (``[p * 128 + r]``), zero-padded in both directions
- ``scales_t`` (S, n_pad) float32: the scales transposed (one scale group's column contiguous), rows
  zero-padded to ``n_pad = n_rt * 128``; the accumulators are (n_chunks, b, n_pad) float32 too
- ``tq``       (16 * 256,) int16: one token's tables of one block, quantized with one scale
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.extending import intrinsic

from .cpu_vq_numba import ENTRIES, FASTMATH, QB, fill_table
from .numba_threads import address_to_pointer as ptr
from .numba_threads import fetch_add, work_counter

TILE_ROWS = 128  # rows per tile: 4 vectors of 32 int16 lanes share each table's 8 registers
SUM16 = 4  # lookups summed in int16 lanes before widening to int32 (widening is a third of the loop's work)
TABLE_MAX = 8190.0  # largest |entry| after rounding: SUM16 of them fit in int16 (4 x 8190 <= 32767)

TILE_BYTES = QB * TILE_ROWS  # uint8 codes of one tile
TABLES_BYTES = QB * ENTRIES * 2  # int16 tables of one token and block

_V_I8 = ir.VectorType(ir.IntType(8), 32)
_V_I16 = ir.VectorType(ir.IntType(16), 32)
_V_I32 = ir.VectorType(ir.IntType(32), 32)
_V_F32 = ir.VectorType(ir.FloatType(), 32)
_I64 = ir.IntType(64)


def _splat(vector_type, value):
    return ir.Constant(vector_type, [ir.Constant(vector_type.element, value)] * vector_type.count)


def _vpermi2w(module):
    """``vpermi2w`` on 512-bit registers: lane i = concat(a, b)[idx[i] & 63] (64 int16 entries)."""
    name = "llvm.x86.avx512.vpermi2var.hi.512"
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(_V_I16, [_V_I16, _V_I16, _V_I16]), name)
    return fn


def _lookup32(builder, perm, table, idx):
    """32 lanes of a 256-entry int16 table (8 registers): 4 permutes, then select by index bits 6 and 7."""
    quarter = [builder.call(perm, [table[2 * i], idx, table[2 * i + 1]]) for i in range(4)]
    zero = _splat(_V_I16, 0)
    bit6 = builder.icmp_unsigned("!=", builder.and_(idx, _splat(_V_I16, 64)), zero)
    bit7 = builder.icmp_unsigned("!=", builder.and_(idx, _splat(_V_I16, 128)), zero)
    low = builder.select(bit6, quarter[1], quarter[0])
    high = builder.select(bit6, quarter[3], quarter[2])
    return builder.select(bit7, high, low)


@intrinsic
def lut_tile(typingctx, table_address, codes_address, out_address, scales_address, table_scale):
    """out[r] += table_scale * scales[r] * sum_p table[p, codes[p, r]] for one tile of 16 positions x 128 rows.

    ``table`` (16, 256) int16, ``codes`` (16, 128) uint8, ``out`` and ``scales`` (128,) float32; unaligned
    addresses are fine. Each position's table is loaded into 8 registers once and read by 4 x 32 rows;
    each lookup is one lane of a ``vpermi2w`` (T-MAC's idea with AVX-512's 64-entry word permutes instead
    of ``pshufb``), so 32 lookups cost about 10 instructions instead of 32 scalar loads and adds. SUM16
    positions are summed in int16 lanes (exact: |entry| <= TABLE_MAX), then widened into int32; the
    tile's exact sums are scaled and added to ``out`` in registers (a store and reload of the sums cost
    a fifth of the loop).
    """

    def codegen(context, builder, signature, args):
        perm = _vpermi2w(builder.module)
        tables = builder.inttoptr(args[0], _V_I16.as_pointer())
        codes = builder.inttoptr(args[1], _V_I8.as_pointer())
        outs = builder.inttoptr(args[2], _V_F32.as_pointer())
        scales = builder.inttoptr(args[3], _V_F32.as_pointer())
        n_vecs = TILE_ROWS // 32
        acc = [_splat(_V_I32, 0)] * n_vecs
        for p0 in range(0, QB, SUM16):
            acc16 = [_splat(_V_I16, 0)] * n_vecs
            for p in range(p0, min(QB, p0 + SUM16)):
                table = [builder.load(builder.gep(tables, [ir.Constant(_I64, p * 8 + i)]), align=2) for i in range(8)]
                for v in range(n_vecs):
                    code = builder.load(builder.gep(codes, [ir.Constant(_I64, p * n_vecs + v)]), align=1)
                    acc16[v] = builder.add(acc16[v], _lookup32(builder, perm, table, builder.zext(code, _V_I16)))
            acc = [builder.add(acc[v], builder.sext(acc16[v], _V_I32)) for v in range(n_vecs)]
        splat = builder.insert_element(ir.Constant(_V_F32, None), args[4], ir.Constant(ir.IntType(32), 0))
        table_scale = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(ir.IntType(32), 32), [0] * 32))
        for v in range(n_vecs):
            out_v = builder.gep(outs, [ir.Constant(_I64, v)])
            scale = builder.fmul(builder.load(builder.gep(scales, [ir.Constant(_I64, v)]), align=4), table_scale)
            total = builder.fadd(builder.load(out_v, align=4), builder.fmul(builder.sitofp(acc[v], _V_F32), scale))
            builder.store(total, out_v, align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64, types.float32), codegen


@njit(nogil=True, inline="always")
def max_abs(tf):
    """max |tf| of finite floats, as an integer max over the bit patterns without the sign bit.

    (Non-negative floats order like their bit patterns; LLVM vectorizes this integer reduction, and
    measured 8x faster than the float ``max(top, abs(v))`` loop, which it left scalar.)
    """
    bits = tf.view(np.int32)
    top = np.int32(0)
    for i in range(bits.size):
        top = max(top, bits[i] & np.int32(0x7FFFFFFF))
    return np.array([top], np.int32).view(np.float32)[0]


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def quantize_table(tf, tq):
    """tq = round(tf / s) as int16 with s = max|tf| / TABLE_MAX; returns s (0 for an all-zero table)."""
    top = max_abs(tf)
    if top == 0.0:
        tq[:] = 0
        return np.float32(0.0)
    inv = np.float32(TABLE_MAX) / top
    for i in range(tf.size):
        tq[i] = np.int16(np.floor(tf[i] * inv + np.float32(0.5)))
    return top / np.float32(TABLE_MAX)


# Field positions of the job's args (then one int64 work counter, as in cpu_vq_numba):
T_X, T_TILES, T_CBT, T_QCB, T_SCALES_T, T_ACC = range(6)  # addresses
T_B, T_IN_PAD, T_N_BLK, T_N_RT, T_NQ, T_CBT_N, T_M, T_D, T_SGQ, T_N_CHUNKS = range(6, 16)
LUT16_ARGS = 16


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def lut16_job(a):
    """Take chunks of table blocks off the shared counter (as ``cpu_vq_numba.lut_job``), int16 tables.

    Per block and token the 16 fp32 tables are built, then quantized to int16 with one scale; every
    row tile's exact int32 sums are scaled back and added into the chunk's fp32 accumulator.
    """
    b, n_blk, n_rt, nq = a[T_B], a[T_N_BLK], a[T_N_RT], a[T_NQ]
    n_chunks, sgq = a[T_N_CHUNKS], a[T_SGQ]
    x = carray(ptr(a[T_X]), (b, a[T_IN_PAD]), np.float32)
    cbt = carray(ptr(a[T_CBT]), (a[T_CBT_N],), np.float32)
    qcb = carray(ptr(a[T_QCB]), (nq,), np.int32)
    n_pad = n_rt * TILE_ROWS
    acc = carray(ptr(a[T_ACC]), (n_chunks, b, n_pad), np.float32)
    tf = np.empty(QB * ENTRIES, np.float32)
    tq = np.empty((b, QB * ENTRIES), np.int16)
    table_scale = np.empty(b, np.float32)
    tq_address = tq.ctypes.data
    counter = work_counter(a)
    while True:
        c = fetch_add(counter, 1)
        if c >= n_chunks:
            return
        acc[c][:] = 0.0
        for blk in range(c * n_blk // n_chunks, (c + 1) * n_blk // n_chunks):
            n_pos = min(QB, nq - blk * QB)
            for t in range(b):
                fill_table(x[t], cbt, qcb, blk * QB, n_pos, a[T_M], a[T_D], tf)
                tf[n_pos * ENTRIES :] = 0.0  # padded positions (code 0) add nothing
                table_scale[t] = quantize_table(tf, tq[t])
            tile_address = a[T_TILES] + blk * n_rt * TILE_BYTES  # plain addresses: no array views per tile
            scale_address = a[T_SCALES_T] + (blk * QB // sgq) * n_pad * 4
            out_address = acc[c].ctypes.data
            for rt in range(n_rt):
                for t in range(b):
                    out_t = out_address + (t * n_pad + rt * TILE_ROWS) * 4
                    lut_tile(tq_address + t * TABLES_BYTES, tile_address, out_t, scale_address, table_scale[t])
                tile_address += TILE_BYTES
                scale_address += TILE_ROWS * 4


@cfunc(types.void(types.voidptr), cache=True)
def lut16_job_c(data):
    """``lut16_job`` with the C signature of an OpenMP team body."""
    lut16_job(carray(data, (LUT16_ARGS + 1,), np.int64))
