"""Numba loops behind the ``cpu_lut_avx512`` VQLinear kernel (see ``cpu_lut_avx512`` for the design).

Import this module only on a CPU (or numba target) with AVX-512F/BW/VBMI: ``lut_tile`` calls the
``vpermi2b`` intrinsic, which LLVM cannot lower for other targets (``cpu_lut_avx512.isa_missing``).

Shapes (C-contiguous numpy arrays), in addition to those of ``cpu_vq_numba``:
- ``tiles``    (n_blk, n_rt, 16 * 128) uint8: the codes of table block ``blk`` (16 code positions) and row
  tile ``rt`` (128 rows), position-major (``[p * 128 + byte]``), zero-padded in both directions; within
  each group of 64 rows the bytes are in ``ROW_OF_BYTE`` order (see ``lut_tile``)
- ``scales_t`` (S, n_pad) float32: the scales transposed (one scale group's column contiguous), rows
  zero-padded to ``n_pad = n_rt * 128``; the accumulators are (n_chunks, b, n_pad) float32 too
- ``tq``       (16 * 512,) uint8: one token's tables of one block as integers (one scale), each position's
  256 low bytes then its 256 high bytes
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core.extending import intrinsic

from .cpu_vq_numba import ENTRIES, FASTMATH, QB, fill_table
from .numba_threads import address_to_pointer as ptr
from .numba_threads import fetch_add, work_counter

TILE_ROWS = 128  # rows per tile: 2 groups of 64 byte lanes share each table's 8 registers
SUM16 = 4  # lookups summed in int16 lanes before widening to int32 (widening is a third of the loop's work)
TABLE_MAX = 8190.0  # largest |entry| after rounding: SUM16 of them fit in int16 (4 x 8190 <= 32767)

TILE_BYTES = QB * TILE_ROWS  # uint8 codes of one tile
TABLES_BYTES = QB * ENTRIES * 2  # the integer tables of one token and block (low and high bytes)

_V_I8 = ir.VectorType(ir.IntType(8), 64)
_V_I16 = ir.VectorType(ir.IntType(16), 32)
_V_I32 = ir.VectorType(ir.IntType(32), 32)
_V_F32 = ir.VectorType(ir.FloatType(), 32)
_I64 = ir.IntType(64)


def _interleave(low_half: bool) -> list[int]:
    """``vpunpck{l,h}bw`` as a shuffle of (low bytes, high bytes): in each 128-bit lane, bytes 0-7 (or 8-15)
    of both, interleaved, i.e. 32 little-endian int16 words."""
    first = 0 if low_half else 8
    return [lane * 16 + first + i // 2 + (64 if i % 2 else 0) for lane in range(4) for i in range(16)]


def _row_of_byte() -> np.ndarray:
    """Row (0-63) whose code sits at byte b of a 64-byte group, so that the two interleaves give rows 0-31 and
    32-63 in order: word w of the low interleave comes from byte (w // 8) * 16 + w % 8, of the high one from
    the byte 8 further."""
    row = np.empty(64, np.int64)
    for r in range(64):
        w = r % 32
        row[(w // 8) * 16 + w % 8 + (8 if r >= 32 else 0)] = r
    return row


ROW_OF_BYTE = _row_of_byte()


def _splat(vector_type, value):
    return ir.Constant(vector_type, [ir.Constant(vector_type.element, value)] * vector_type.count)


def _vpermi2b(module):
    """``vpermi2b`` on 512-bit registers: byte i = concat(a, b)[idx[i] & 127] (128 byte entries)."""
    name = "llvm.x86.avx512.vpermi2var.qi.512"
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(_V_I8, [_V_I8, _V_I8, _V_I8]), name)
    return fn


def _lookup64(builder, perm, table, idx):
    """64 rows' int16 entries of one 256-entry table, as two vectors of 32 words (rows in ROW_OF_BYTE order).

    ``table`` is 8 registers: low bytes of entries 0-127, 128-255, then the high bytes likewise. Each half
    is 2 byte permutes and a select by index bit 7; the interleave of low and high bytes makes the words.
    """
    upper = builder.icmp_signed("<", idx, _splat(_V_I8, 0))  # bit 7: entries 128-255
    low = builder.select(
        upper, builder.call(perm, [table[2], idx, table[3]]), builder.call(perm, [table[0], idx, table[1]])
    )
    high = builder.select(
        upper, builder.call(perm, [table[6], idx, table[7]]), builder.call(perm, [table[4], idx, table[5]])
    )
    words = []
    for low_half in (True, False):
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 64), _interleave(low_half))
        words.append(builder.bitcast(builder.shuffle_vector(low, high, mask), _V_I16))
    return words


@intrinsic
def lut_tile(typingctx, table_address, codes_address, out_address, scales_address, table_scale):
    """out[r] += table_scale * scales[r] * sum_p table[p, codes[p, r]] for one tile of 16 positions x 128 rows.

    ``table`` (16 positions x 512 bytes, see ``tq``), ``codes`` (16, 128) uint8 (rows in ROW_OF_BYTE order
    per 64), ``out`` and ``scales`` (128,) float32; unaligned addresses are fine. Each position's table is
    loaded into 8 registers once and read by 2 x 64 rows; a lookup is one byte lane of ``vpermi2b`` for
    its low byte and one for its high byte (T-MAC's idea with AVX-512's 128-entry byte permutes instead of
    ``pshufb``): 64 lookups cost about 12 instructions instead of 64 scalar loads and adds. SUM16
    positions are summed in int16 lanes (exact: |entry| <= TABLE_MAX), then widened into int32; the
    tile's exact sums are scaled and added to ``out`` in registers.
    """

    def codegen(context, builder, signature, args):
        perm = _vpermi2b(builder.module)
        tables = builder.inttoptr(args[0], _V_I8.as_pointer())
        codes = builder.inttoptr(args[1], _V_I8.as_pointer())
        outs = builder.inttoptr(args[2], _V_F32.as_pointer())
        scales = builder.inttoptr(args[3], _V_F32.as_pointer())
        n_groups = TILE_ROWS // 64
        acc = [_splat(_V_I32, 0)] * (2 * n_groups)  # 32 rows each, in order
        for p0 in range(0, QB, SUM16):
            acc16 = [_splat(_V_I16, 0)] * (2 * n_groups)
            for p in range(p0, min(QB, p0 + SUM16)):
                table = [builder.load(builder.gep(tables, [ir.Constant(_I64, p * 8 + i)]), align=1) for i in range(8)]
                for g in range(n_groups):
                    idx = builder.load(builder.gep(codes, [ir.Constant(_I64, p * n_groups + g)]), align=1)
                    first, second = _lookup64(builder, perm, table, idx)
                    acc16[2 * g] = builder.add(acc16[2 * g], first)
                    acc16[2 * g + 1] = builder.add(acc16[2 * g + 1], second)
            acc = [builder.add(a, builder.sext(a16, _V_I32)) for a, a16 in zip(acc, acc16)]
        one = builder.insert_element(ir.Constant(_V_F32, None), args[4], ir.Constant(ir.IntType(32), 0))
        table_scale = builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), 32), [0] * 32))
        for v, total in enumerate(acc):
            out_v = builder.gep(outs, [ir.Constant(_I64, v)])
            scale = builder.fmul(builder.load(builder.gep(scales, [ir.Constant(_I64, v)]), align=4), table_scale)
            total = builder.fadd(builder.load(out_v, align=4), builder.fmul(builder.sitofp(total, _V_F32), scale))
            builder.store(total, out_v, align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64, types.float32), codegen


@njit(nogil=True, inline="always")
def max_abs_bits(tf):
    """Bit pattern of max |tf|: an integer max over the patterns without the sign bit.

    Non-negative floats order like their bit patterns, and LLVM vectorizes this integer reduction (8x faster
    than the float ``max(top, abs(v))`` loop, which it left scalar). NaN and inf patterns are the largest,
    and integers are safe from the fast-math flags, which assume neither occurs.
    """
    bits = tf.view(np.int32)
    top = np.int32(0)
    for i in range(bits.size):
        top = max(top, bits[i] & np.int32(0x7FFFFFFF))
    return top


@njit(nogil=True, inline="always")
def _float_of_bits(bits):
    return np.array([bits], np.int32).view(np.float32)[0]


@njit(nogil=True, fastmath=FASTMATH, inline="always")
def quantize_table(tf, tq):
    """Round the (16, 256) fp32 tables ``tf`` to integers v = round(tf / s), s = max|tf| / TABLE_MAX, stored
    in ``tq`` as low bytes then high bytes per position (``tq[p*512 + k]``, ``tq[p*512 + 256 + k]``).
    Returns s: 0 for all-zero tables, NaN when an entry is inf or NaN (so every output it feeds is NaN,
    as the reference's would be non-finite, instead of garbage from converting NaN to an integer)."""
    top_bits = max_abs_bits(tf)
    if top_bits == 0 or top_bits >= np.int32(0x7F800000):
        tq[:] = 0
        return _float_of_bits(np.int32(0) if top_bits == 0 else np.int32(0x7FC00000))
    top = _float_of_bits(top_bits)
    inv = np.float32(TABLE_MAX) / top
    for p in range(QB):
        for k in range(ENTRIES):
            v = np.int32(np.floor(tf[p * ENTRIES + k] * inv + np.float32(0.5)))
            tq[p * 2 * ENTRIES + k] = np.uint8(v & 255)
            tq[p * 2 * ENTRIES + ENTRIES + k] = np.uint8((v >> 8) & 255)
    return top / np.float32(TABLE_MAX)


# Field positions of the job's args (then one int64 work counter, as in cpu_vq_numba):
T_X, T_TILES, T_CBT, T_QCB, T_SCALES_T, T_ACC = range(6)  # addresses
T_B, T_IN_PAD, T_N_BLK, T_N_RT, T_NQ, T_CBT_N, T_M, T_D, T_SGQ, T_N_CHUNKS = range(6, 16)
LUT16_ARGS = 16


@njit(nogil=True, inline="always")
def _tile_loop(table_address, tiles_address, out_address, scales_address, n_rt, table_scale):
    """One token's lookups of one block of positions for every row tile (the block's tiles are contiguous)."""
    for rt in range(n_rt):
        lut_tile(table_address, tiles_address + rt * TILE_BYTES, out_address + rt * TILE_ROWS * 4,
                 scales_address + rt * TILE_ROWS * 4, table_scale)  # fmt: skip


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def lut16_job(a):
    """Take chunks of table blocks off the shared counter (as ``cpu_vq_numba.lut_job``), int16 tables.

    Per block and token the 16 fp32 tables are built, then rounded to integers with one scale; every
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
    tq = np.empty((b, TABLES_BYTES), np.uint8)
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
            tiles_address = a[T_TILES] + blk * n_rt * TILE_BYTES  # plain addresses: no array views per tile
            scales_address = a[T_SCALES_T] + (blk * QB // sgq) * n_pad * 4
            for t in range(b):  # tokens outside the tile loop: a token loop inside it measured 15% slower
                out_address = acc[c, t].ctypes.data
                _tile_loop(
                    tq_address + t * TABLES_BYTES, tiles_address, out_address, scales_address, n_rt, table_scale[t]
                )


@cfunc(types.void(types.voidptr), cache=True)
def lut16_job_c(data):
    """``lut16_job`` with the C signature of an OpenMP team body."""
    lut16_job(carray(data, (LUT16_ARGS + 1,), np.int64))
