"""``cpu_lut_avx512``: ``cpu_lut`` with integer tables read by AVX-512 byte permutes (AVX-512BW + VBMI).

Why: ``cpu_lut``'s scalar loop costs one load and one add per lookup and is bound by that, not by
memory (docs/kernels.md), so int8 ``quantize_dynamic`` stays ahead of it at batch 1. T-MAC makes the
lookups vector operations by keeping 16-entry tables in registers (``pshufb``). AVX-512 VBMI's
``vpermi2b`` picks bytes out of a 128-entry table held in two registers, so a 256-entry table of
16-bit integers fits in 8 registers (low bytes and high bytes of each half) and 64 rows look up their
codes in 4 permutes, 2 selects (index bit 7) and 2 interleaves that turn byte pairs into words: about
3.5x fewer cycles per lookup than the scalar loop on the Zen4 test machine (docs/kernels.md; a first
version with ``vpermi2w`` on 64-entry word tables needed twice the permutes and measured 1.8x slower).

Precision: the tables of one token and one block of 16 code positions are rounded to integers in
[-8190, 8190] with one scale (``max |entry| / 8190``), so that 4 lookups add up in int16 lanes before
they are widened (a third faster than widening every lookup); the 16 lookups of a row are summed
exactly, then scaled back and accumulated in fp32. Each entry is off by at most half a step, 6.1e-5 of
the block's largest entry: far below the weights' own 2-bit error, and finer than the 8-bit
activations or tables of llama.cpp and T-MAC. The stated tolerance is in
tests/test_kernels_cpu_avx512.py. ``VQLINEAR_KERNELS=cpu_lut`` forces the fp32-table loop.

Layout: the codes are re-laid once per layer into tiles of 16 positions x 128 rows, position-major
with the rows of each 64 in the order the interleave produces (``Prepared.tiles``: as many bytes as the
codes), so a tile is one 2 KiB sequential read. Everything else (formats covered, threads, chunked
accumulators summed in chunk order, dequant + BLAS for prefill) is ``cpu_lut``'s, except that the
lookups can stay faster than dequant + BLAS up to hundreds of tokens: how far depends on the CPU, so
``lut_max_batch`` asks a cost model measured on this CPU (``cpu_crossover``).

The instruction set is checked before anything is compiled: on a CPU (or a numba target set with
``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) without AVX-512F, BW and VBMI (e.g. Skylake-X and Cascade
Lake lack VBMI; Ice Lake, Sapphire Rapids and Zen 4 have it) the kernel declines every call with that
reason, warns once, and ``cpu_lut`` runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from . import Kernel, cpu_crossover, register_kernel
from . import cpu_lut as base
from .cpu_threads import job_args, run_job

NAME = "cpu_lut_avx512"
REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512vbmi")
# The lookups beat dequant + BLAS beyond 1,024 tokens on some CPUs and below 16 on others: the limit comes from
# a cost model measured on this CPU (cpu_crossover), capped at LUT_MAX_TOKENS to bound the per-chunk accumulators
# (tokens x out fp32 each, at least MIN_CHUNKS of them).
LUT_MAX_TOKENS = 256
MIN_CHUNKS = 2  # accumulator chunks of a call on the team, whatever its size (see _lut16)

_numba_mod = None
_compile_seconds: float | None = None
_isa_reason: str | None = None  # "" once checked and present
_warned = False


def isa_missing() -> str | None:
    """None when numba compiles for a target with AVX-512F/BW/VBMI, otherwise why not (checked once)."""
    global _isa_reason
    if _isa_reason is None:
        _isa_reason = _check_isa()
    return _isa_reason or None


def _check_isa() -> str:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with {' and '.join(REQUIRED_FEATURES)}, this is {platform.machine()}"
    try:
        from llvmlite import binding
        from numba.core import config
    except ImportError as exc:
        return f"numba is not importable ({exc})"
    if config.CPU_FEATURES:  # numba compiles for these features, not the host's
        features = {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
        where = f"NUMBA_CPU_FEATURES={config.CPU_FEATURES}"
    elif config.CPU_NAME:
        return f"NUMBA_CPU_NAME={config.CPU_NAME} without NUMBA_CPU_FEATURES: the target's features are unknown"
    else:
        features = {name for name, present in binding.get_host_cpu_features().items() if present}
        where = f"this CPU ({binding.get_host_cpu_name()})"
    missing = [f for f in REQUIRED_FEATURES if f not in features]
    return f"{where} lacks {', '.join(missing)} (vpermi2b)" if missing else ""


def _warn_isa_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"vqlib.kernels: {NAME} cannot run: {reason}; decoding uses cpu_lut (fp32 tables, about 3x slower "
            "lookups, see docs/kernels.md)",
            RuntimeWarning,
            stacklevel=2,
        )


def supports(layer, x: Tensor) -> str | None:
    why = base.supports(layer, x)
    if why is not None:
        return why
    missing = isa_missing()
    if missing is not None:
        _warn_isa_once(missing)
    return missing


def load_numba():
    """Import (compile or load from cache) the AVX-512 loops, or raise KernelBuildError."""
    global _numba_mod, _compile_seconds
    if _numba_mod is None:
        _numba_mod, _compile_seconds = base.import_loops("cpu_vq_avx512_numba", _warm_up, NAME)
    return _numba_mod


def compile_seconds() -> float | None:
    return _compile_seconds


def _warm_up(mod) -> None:
    """Compile the job on a tiny problem (3 rows, 2 positions, d = 2) so a failure surfaces here."""
    codes = np.zeros((3, 2), np.uint8)
    cbt = np.zeros(2 * 256, np.float32)
    p = base.Prepared(None, codes, cbt, np.zeros(2 * 256, np.float32), np.zeros(2, np.int32),
                      np.ones((3, 1), np.float32), 2, np.zeros(2, np.int64), 2, 2, 1)  # fmt: skip
    _lut16(mod, p, torch.zeros(1, 4), serial=True)


def tiles(p: base.Prepared, mod) -> np.ndarray:
    """(n_blk, n_rt, 16 * 128) uint8: each tile's codes position-major, zero-padded (built once per layer)."""
    if p.tiles is None:
        n_out, nq = p.codes.shape
        qb, rows = base.QB, mod.TILE_ROWS
        n_blk, n_rt = -(-nq // qb), -(-n_out // rows)
        padded = np.pad(p.codes, ((0, n_rt * rows - n_out), (0, n_blk * qb - nq)))  # (n_rt*rows, n_blk*qb)
        tiled = padded.reshape(n_rt, rows, n_blk, qb).transpose(2, 0, 3, 1)  # (n_blk, n_rt, qb, rows)
        tiled = tiled.reshape(n_blk, n_rt, qb, rows // 64, 64)[..., mod.ROW_OF_BYTE]  # the loop's byte order
        p.tiles = np.ascontiguousarray(tiled).reshape(n_blk, n_rt, qb * rows)
        p.scales_t = np.ascontiguousarray(np.pad(p.scales.T, ((0, 0), (0, n_rt * rows - n_out))))
    return p.tiles


def _template(m, p: base.Prepared) -> np.ndarray:
    t = tiles(p, m)
    addr = {m.T_TILES: t, m.T_CBT: p.cbt, m.T_QCB: p.qcb, m.T_SCALES_T: p.scales_t}
    sizes = {
        m.T_IN_PAD: p.n_vec * p.d, m.T_N_BLK: t.shape[0], m.T_N_RT: t.shape[1], m.T_NQ: p.codes.shape[1],
        m.T_CBT_N: p.cbt.size, m.T_M: p.m_books, m.T_D: p.d, m.T_SGQ: p.sgq,
    }  # fmt: skip
    return job_args(m.LUT16_ARGS, {**{k: a.ctypes.data for k, a in addr.items()}, **sizes})


def _lut16(m, p: base.Prepared, xp: Tensor, serial: bool) -> Tensor:
    """(b, out) float32 lookup result on torch's threads (see cpu_vq_avx512_numba.lut16_job)."""
    t = tiles(p, m)
    b, n_out, n_blk, n_pad = xp.shape[0], p.codes.shape[0], t.shape[0], t.shape[1] * m.TILE_ROWS
    # Chunks bound the accumulators' memory (ACC_BYTES), but never below MIN_CHUNKS: at prefill sizes one chunk
    # left the second thread idle (measured: 48 tokens, 2 threads, as slow as 1 thread). Not tied to the thread
    # count, so results stay bitwise the same with 1 or 2 threads.
    by_memory = base.ACC_BYTES // (4 * b * n_pad)
    n_chunks = 1 if serial else min(n_blk, max(MIN_CHUNKS, min(base.LUT_CHUNKS, by_memory)))
    acc = torch.empty(n_chunks, b, n_pad)  # the job zeroes each chunk's accumulator
    if p.lut16_args is None:
        p.lut16_args = _template(m, p)
    args = p.lut16_args.copy()
    args[m.T_X], args[m.T_ACC], args[m.T_B], args[m.T_N_CHUNKS] = xp.data_ptr(), acc.data_ptr(), b, n_chunks
    run_job(m.lut16_job, m.lut16_job_c, args, 1 if serial else max(1, torch.get_num_threads()))
    out = acc[0] if n_chunks == 1 else torch.from_numpy(np.add.reduce(acc.numpy(), axis=0))  # chunk order
    return out if n_pad == n_out else out[:, :n_out].contiguous()  # callers .view() the output


def lut_max_batch(layer) -> int:
    """Most tokens per call that take the lookup path; more go to dequant + BLAS (see cpu_crossover).

    The first call measures this CPU (about 75 ms, once per process); VQLIB_CPU_LUT_MAX_TOKENS pins it."""
    return cpu_crossover.lut_max_tokens(NAME, layer, _lookups, base.dequant_blas, cap=LUT_MAX_TOKENS)


def _lookups(layer, x: Tensor) -> Tensor:
    p = base.prepare(layer)
    return _lut16(load_numba(), p, base.padded_input(layer, x, p.n_vec * p.d), serial=False)


def run(layer, x: Tensor) -> Tensor:
    mod = load_numba()
    p = base.prepare(layer)
    xp = base.padded_input(layer, x, p.n_vec * p.d)
    b = xp.shape[0]
    if b > 1 and b > lut_max_batch(layer):  # one token always looks up (decoding: memory-bound)
        out = base.blas_linear(base.load_numba(), p, xp)
    else:
        out = _lut16(mod, p, xp, serial=p.codes.size * b < base.SERIAL_MAX_CODES)
    return base.finish(out, layer, x)


KERNEL = Kernel(
    name=NAME,
    layer_type="VQLinear",
    device_type="cpu",
    run=run,
    supports=supports,
    priority=20,
    describe=lambda layer, x: base.describe_path(layer, x, lut_max_batch),
)
register_kernel(KERNEL)

__all__ = ["KERNEL", "NAME", "compile_seconds", "isa_missing", "load_numba", "lut_max_batch", "run", "supports"]
