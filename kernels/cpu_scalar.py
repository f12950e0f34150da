"""``cpu_scalar``: the CPU kernel for ``ScalarLinear`` (the scalar round-to-nearest baseline).

So that baseline comparisons measure the format and not a slow reference: at small batches each
row's bit-packed levels are unpacked into an L1 buffer and dotted with every token (group scales
and zeros applied per group, using per-group input sums); above ``GEMV_MAX_BATCH`` tokens bounded
blocks of rows are dequantized by compiled code and multiplied with torch's BLAS. Levels are read
straight from the packed ``qweight`` (no unpacked copy is kept); the per-layer cache holds float32
scales and zeros only (``layer._cpu_scalar_cache``, rebuilt when a buffer changes, never saved).
Threads and numba handling are shared with ``cpu_lut``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import Kernel, register_kernel
from .cpu_lut import INPUT_DTYPES, _threads, finish, import_loops
from .cpu_threads import job_args, run_job

NAME = "cpu_scalar"
GEMV_MAX_BATCH = 2  # unpack-and-dot up to here; block dequant + BLAS above (measured: 4096x4096, 4 bits)
BLAS_BLOCK_BYTES = 4 << 20
ROWS_PER_ITEM = 16  # rows per work item of the threads

_numba_mod = None
_compile_seconds: float | None = None


def _warm_up(mod) -> None:
    q = np.zeros(8, np.uint8)
    s, z = np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32)
    x, xs, out = np.zeros((1, 8), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 2), np.float32)
    mod.gemv_rows(x, xs, q, 4, 8, s, z, 8, 0, 2, out, np.empty(8, np.float32))
    mod.dequant_rows(q, 4, 8, s, z, 8, 0, 2, np.empty((2, 8), np.float32))


def load_numba():
    """Import (compile or load from numba's cache) the loops, or raise KernelBuildError."""
    global _numba_mod, _compile_seconds
    if _numba_mod is None:
        _numba_mod, _compile_seconds = import_loops("cpu_scalar_numba", _warm_up, NAME)
    return _numba_mod


@dataclass
class Prepared:
    key: tuple
    qweight: np.ndarray  # (n_bytes,) uint8 view of layer.qweight
    scales: np.ndarray  # (out, n_groups) float32
    zeros: np.ndarray  # (out, n_groups) float32


def prepare(layer) -> Prepared:
    buffers = layer._buffers
    key = tuple((id(t), t.data_ptr(), t._version) for t in (buffers["qweight"], buffers["scales"], buffers["zeros"]))
    cached = getattr(layer, "_cpu_scalar_cache", None)
    if cached is not None and cached.key == key:
        return cached
    prepared = Prepared(
        key=key,
        qweight=layer.qweight.detach().numpy(),
        scales=layer.scales.float().contiguous().numpy(),
        zeros=layer.zeros.float().contiguous().numpy(),
    )
    object.__setattr__(layer, "_cpu_scalar_cache", prepared)  # plain attribute: never saved
    return prepared


def supports(layer, x: Tensor) -> str | None:
    if x.dtype not in INPUT_DTYPES:
        return f"input dtype {x.dtype} not covered (float32, bfloat16, float16)"
    if x.shape[-1] != layer.in_features:
        return f"input has {x.shape[-1]} features, the layer expects {layer.in_features}"
    return None


def _group_sums(xp: np.ndarray, group_size: int, n_groups: int) -> np.ndarray:
    """(b, n_groups) sums of the input over each column group."""
    b, n_in = xp.shape
    padded = np.zeros((b, n_groups * group_size), np.float32)
    padded[:, :n_in] = xp
    return np.ascontiguousarray(padded.reshape(b, n_groups, group_size).sum(-1, dtype=np.float32))


def _run_rows(m, p: Prepared, layer, values: dict[int, int], count: int, n_threads: int) -> None:
    """scalar_job over ``count`` rows with the layer's fields plus ``values`` (see cpu_scalar_numba)."""
    fields = {
        m.S_QWEIGHT: p.qweight.ctypes.data, m.S_SCALES: p.scales.ctypes.data, m.S_ZEROS: p.zeros.ctypes.data,
        m.S_N_IN: layer.in_features, m.S_N_OUT: layer.out_features, m.S_QW_N: p.qweight.size,
        m.S_N_GROUPS: p.scales.shape[1], m.S_BITS: layer.bits, m.S_GS: layer.group_size, m.S_COUNT: count,
        m.S_ROWS_PER_ITEM: ROWS_PER_ITEM, **values,
    }  # fmt: skip
    run_job(m.scalar_job, m.scalar_job_c, job_args(m.SCALAR_ARGS, fields), n_threads)


def run(layer, x: Tensor) -> Tensor:
    m = load_numba()
    p = prepare(layer)
    n_in, n_out, gs = layer.in_features, layer.out_features, layer.group_size
    xp = x.detach().reshape(-1, n_in).to(torch.float32).contiguous().numpy()
    b = xp.shape[0]
    out_np = np.zeros((b, n_out), np.float32)
    if b <= GEMV_MAX_BATCH:
        xsum = _group_sums(xp, gs, p.scales.shape[1])
        n = _threads(n_in * n_out // 4 * b)
        values = {m.S_X: xp.ctypes.data, m.S_XSUM: xsum.ctypes.data, m.S_OUT: out_np.ctypes.data, m.S_B: b}
        _run_rows(m, p, layer, values, n_out, n)
    else:
        rows = max(64, min(1024, BLAS_BLOCK_BYTES // (4 * n_in)))
        buf = np.empty((min(rows, n_out), n_in), np.float32)
        x_t, out_t = torch.from_numpy(xp), torch.from_numpy(out_np)
        for base in range(0, n_out, rows):
            count = min(n_out, base + rows) - base
            values = {m.S_OUT: buf.ctypes.data, m.S_BASE: base}
            _run_rows(m, p, layer, values, count, max(1, torch.get_num_threads()))
            out_t[:, base : base + count] = x_t @ torch.from_numpy(buf[:count]).T
    return finish(torch.from_numpy(out_np), layer, x)


KERNEL = Kernel(name=NAME, layer_type="ScalarLinear", device_type="cpu", run=run, supports=supports, priority=10)
register_kernel(KERNEL)

__all__ = ["KERNEL", "NAME", "load_numba", "prepare", "run", "supports"]
