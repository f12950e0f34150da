"""``cpu_lut``: the CPU kernel for ``VQLinear`` (lookup tables at small batch, dequant + BLAS above).

Small batches (decoding). For each token and each code position ``q = j * M + m`` (vector ``j``,
codebook ``m``) a table holds the dot products of the activation slice ``x[j*d:(j+1)*d]`` with all
256 entries of that position's codebook. Row ``o``'s output is then a sum of table lookups indexed
by its codes, times its scale: ``y[o] = sum_blocks scale[o, s] * sum_q T[q, codes[o, q]]``. Tables
are built 16 positions at a time (16 x 256 fp32 = 16 KiB: it stays in L1) and every row reads its
16 codes for that block before the next block is built. One lookup costs one table load and one add
(about 0.25 ns on the Zen3 test machine, near its 6-wide dispatch limit; codes are read 8 per
64-bit word and extracted with shifts); AVX2 gathers (``llvm.x86.avx2.gather.d.ps.256``) measured
slower than scalar loads on Zen3 (about 13 cycles per 8-lane gather), so the inner loop is scalar
with four independent add chains. Accumulation is fp32; bf16/fp16 inputs
are converted to fp32 on entry and the output is cast back to the input dtype.

Larger batches: the table work grows with the number of tokens while a dequantized weight is
built once, so above ``lut_max_batch(layer)`` tokens (prefill) bounded blocks of rows (``BLAS_BLOCK_BYTES``
of fp32, 256-1024 rows) are dequantized by compiled code and multiplied with torch's BLAS. Where that
starts depends on the CPU and the shape, so a cost model measured on this CPU at the first multi-token
call sets it (``cpu_crossover``; ``VQLIB_CPU_LUT_MAX_TOKENS`` pins it). Measured (ms per layer, LUT vs
dequant + BLAS): Zen3, 4096x4096, d4 1x8, one thread, load ~7: 8 tokens 16.5 vs 34, 16 tokens 22 vs 27, 32
tokens 45 vs 37; Xeon (2026-12-01), 2 threads: 4096x4096 16 tokens 6.4 vs 7.7, 32 tokens 12.5 vs 9.1, but
1536x576 d4 2x8 8 tokens 0.43 vs 0.42 and 16 tokens 0.83 vs 0.53, where the old fixed limit of 16 tokens was
1.6x slower than BLAS. Both paths beat the reference path (dequantize everything in torch, then F.linear) at
every batch size, since the BLAS path is that same matmul on a faster dequantization.

Threads (see ``cpu_threads``): the work runs on torch's own OpenMP team, ``torch.get_num_threads()``
threads. The table blocks are cut into ``LUT_CHUNKS`` chunks that the threads take off a shared
counter; each chunk adds into its own accumulator and the accumulators are summed in chunk order,
so each table is built once and the result does not depend on the thread count. Layers below
``SERIAL_MAX_CODES`` codes x tokens run on the calling thread in one chunk (a team start costs more
than their whole work).

Per-layer data is prepared once and kept as a plain, non-persistent attribute of the layer
(``layer._cpu_lut_cache``; never in ``state_dict``, never saved): fp32 codebooks with the int8
codebook scales folded in (two layouts), fp32 scales, the codebook index of every code position,
a zero-copy numpy view of ``codes`` and a block-major copy of them (as many bytes as the codes:
the memory cost of the kernel). It is rebuilt whenever one of the layer's buffers is replaced,
moved (new storage) or written in place (``Tensor._version``).

Compiled with numba (``cache=True``: machine code is stored and reused across processes); if numba
is missing or compilation fails, ``run`` raises ``KernelBuildError`` and the registry falls back to
the reference path with one loud warning.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import Kernel, KernelBuildError, register_kernel
from .cpu_threads import job_args, run_job

NAME = "cpu_lut"
QB = 16  # code positions per table block (keep equal to cpu_vq_numba.QB)
LUT_MAX_TOKENS = 256  # cap of the measured lookup limit (cpu_crossover): above, BLAS on dequantized row blocks
LUT_CHUNKS = 8  # chunks of table blocks per parallel LUT call: work items for the team's threads
ACC_BYTES = 1 << 20  # cap on the per-chunk accumulators of one call (fewer chunks for wide outputs)
DEQUANT_ROWS_PER_ITEM = 16  # rows per work item of the parallel dequantization
BLAS_BLOCK_BYTES = 4 << 20  # fp32 bytes of one dequantized row block (256-1024 rows of typical widths)
SERIAL_MAX_CODES = 1 << 19  # below this many codes x tokens one thread beats starting the team (docs/kernels.md)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_numba_mod = None
_compile_seconds: float | None = None


def import_loops(module_name: str, warm_up, kernel_name: str):
    """Import a numba loop module of this package and compile every entry point once (``warm_up(mod)``), so a
    failure surfaces here, not mid-model. Returns (module, seconds); raises KernelBuildError on failure."""
    start = time.perf_counter()
    try:
        mod = importlib.import_module(f"{__package__}.{module_name}")
        warm_up(mod)
    except ImportError as exc:
        raise KernelBuildError(f"numba is not importable ({exc}); install vqlib's dependencies") from exc
    except Exception as exc:  # numba typing/lowering errors have many classes
        raise KernelBuildError(f"numba could not compile the {kernel_name} loops: {type(exc).__name__}: {exc}") from exc
    return mod, time.perf_counter() - start


def load_numba():
    """Import (and on first use compile or load from cache) the numba loops, or raise KernelBuildError."""
    global _numba_mod, _compile_seconds
    if _numba_mod is None:
        _numba_mod, _compile_seconds = import_loops("cpu_vq_numba", _warm_up, NAME)
    return _numba_mod


def compile_seconds() -> float | None:
    """Seconds the first ``load_numba`` took (compile, or load from numba's cache); None before."""
    return _compile_seconds


def _warm_up(mod) -> None:
    """Compile every entry point once on a tiny problem, so a failure surfaces here, not mid-model."""
    x = np.zeros((1, 4), np.float32)
    codes = np.zeros((3, 2), np.uint8)
    blocked = np.zeros((1, 3, 2), np.uint64)
    cbt = np.zeros((1, 2, 256), np.float32).reshape(-1)
    cbf = np.zeros((1, 256, 2), np.float32).reshape(-1)
    qcb = np.zeros(2, np.int32)
    scales = np.ones((3, 1), np.float32)
    w = np.empty((3, 4), np.float32)
    svec = np.zeros(2, np.int64)  # one scale column per vector (n_vec = 2)
    mod.dequant_rows(codes.reshape(-1), cbf, qcb, 1, 2, scales, svec, 2, 0, 3, w)
    p = Prepared(None, codes, cbt, cbf, qcb, scales, 2, svec, 2, 2, 1, blocked=blocked)
    _lut(mod, p, torch.from_numpy(x), serial=True)
    _dequant(mod, p, torch.from_numpy(w), 0, 3)


@dataclass
class Prepared:
    """Per-layer arrays in the layouts the loops read (see cpu_vq_numba for shapes)."""

    key: tuple
    codes: np.ndarray  # (out, nq) uint8, a view of layer.codes
    cbt: np.ndarray  # (G*M*d*256,) float32
    cbf: np.ndarray  # (G*M*256*d,) float32
    qcb: np.ndarray  # (nq,) int32
    scales: np.ndarray  # (out, S) float32
    sgq: int  # code positions per scale group
    svec: np.ndarray  # (n_vec,) int64 scale column of each vector
    n_vec: int
    d: int
    m_books: int
    # Built on first use by the kernel that reads them (each is another copy of the codes):
    blocked: np.ndarray | None = None  # (ceil(nq / 16), out, 2) uint64: the codes block-major, zero-padded
    tiles: np.ndarray | None = None  # cpu_lut_avx512's layout (see cpu_vq_avx512_numba)
    scales_t: np.ndarray | None = None  # (S, out) float32, for cpu_lut_avx512
    lut_args: np.ndarray | None = None  # job argument templates with this layer's fields
    lut16_args: np.ndarray | None = None
    dequant_args: np.ndarray | None = None


def blocked_codes(p: Prepared) -> np.ndarray:
    """(ceil(nq / 16), out, 2) uint64: 16 codes of a row and table block in two little-endian words."""
    if p.blocked is None:
        n_out, nq = p.codes.shape
        n_blk = -(-nq // QB)
        padded = np.pad(p.codes, ((0, 0), (0, n_blk * QB - nq)))  # padded positions: code 0, zero table
        p.blocked = np.ascontiguousarray(padded.reshape(n_out, n_blk, QB).transpose(1, 0, 2)).view(np.uint64)
    return p.blocked


def _buffer_key(layer) -> tuple:
    """Identity, storage and version of every buffer the prepared arrays are derived from."""
    buffers = layer._buffers  # direct dict access: nn.Module.__getattr__ costs more than the rest
    key = []
    for name in ("codes", "codebooks", "codebook_scales", "scales"):
        t = buffers.get(name)
        key.append(None if t is None else (id(t), t.data_ptr(), t._version))
    return tuple(key)


def prepare(layer) -> Prepared:
    """The layer's cached ``Prepared`` arrays, rebuilt when its buffers changed."""
    key = _buffer_key(layer)
    cached = getattr(layer, "_cpu_lut_cache", None)
    if cached is not None and cached.key == key:
        return cached
    d, m, n_vec = layer.vector_dim, layer.num_codebooks, layer.num_vectors
    nq = n_vec * m
    values = layer.codebook_values().float()  # (G, M, 2**B, d), codebook scales folded in
    if values.shape[2] < 256:  # B < 8: zero entries that no code selects keep one table layout
        values = torch.nn.functional.pad(values, (0, 0, 0, 256 - values.shape[2]))
    g = values.shape[0]
    group_of_vec = (
        torch.arange(n_vec) * d // layer.group_size if layer.group_size else torch.zeros(n_vec, dtype=torch.long)
    )
    qcb = (group_of_vec[:, None] * m + torch.arange(m)[None, :]).reshape(nq).to(torch.int32)
    if layer.scales is None:
        scales, sgq = torch.ones(layer.out_features, 1), nq
    else:
        scales = layer.scales.float()
        sgq = nq if layer.scale_granularity == "row" else layer.scale_group_size // d * m
    codes = layer.codes.detach().reshape(layer.out_features, nq)
    prepared = Prepared(
        key=key,
        codes=codes.numpy(),
        cbt=values.permute(0, 1, 3, 2).contiguous().reshape(-1).numpy(),
        cbf=values.contiguous().reshape(-1).numpy(),
        qcb=qcb.numpy(),
        scales=scales.contiguous().numpy(),
        sgq=max(sgq, 1),
        svec=(torch.arange(n_vec) * m // max(sgq, 1)).numpy(),
        n_vec=n_vec,
        d=d,
        m_books=m,
    )
    assert g * m * 256 * d == prepared.cbf.size
    object.__setattr__(layer, "_cpu_lut_cache", prepared)  # plain attribute: not a buffer, never saved
    return prepared


def supports(layer, x: Tensor) -> str | None:
    if x.dtype not in INPUT_DTYPES:
        return f"input dtype {x.dtype} not covered (float32, bfloat16, float16)"
    if x.shape[-1] != layer.in_features:
        return f"input has {x.shape[-1]} features, the layer expects {layer.in_features}"
    if layer.codebook_bits > 8:
        return f"codebook_bits={layer.codebook_bits} not covered (B <= 8: uint8 codes)"
    if not 1 <= layer.vector_dim <= 16 or not 1 <= layer.num_codebooks <= 4:
        return f"vector_dim={layer.vector_dim}, num_codebooks={layer.num_codebooks} not covered (d<=16, M<=4)"
    if layer.scale_granularity == "group" and (layer.scale_group_size // layer.vector_dim * layer.num_codebooks) % QB:
        return f"scale groups of {layer.scale_group_size} columns hold a number of codes that is not a multiple of {QB}"
    return None


def _threads(work: int) -> int:
    """Threads for a call: torch's intra-op count, or 1 when the work is too small to split."""
    n = max(1, torch.get_num_threads())
    return 1 if work < SERIAL_MAX_CODES else n


def padded_input(layer, x: Tensor, in_pad: int) -> Tensor:
    """(b, in_pad) float32 C-contiguous input, zero-padded (padded columns drop out)."""
    if x.dtype == torch.float32 and x.dim() == 2 and in_pad == x.shape[1] and x.is_contiguous():
        return x.detach()  # decoding's common case, without three no-op tensor calls
    x2 = x.detach().reshape(-1, layer.in_features).to(torch.float32)
    if in_pad != layer.in_features:
        x2 = torch.nn.functional.pad(x2, (0, in_pad - layer.in_features))
    return x2.contiguous()


def _lut_template(m, p: Prepared) -> np.ndarray:
    blocked = blocked_codes(p)
    addr = {m.L_BLOCKED: blocked, m.L_CBT: p.cbt, m.L_QCB: p.qcb, m.L_SCALES: p.scales}
    sizes = {
        m.L_N_BLK: blocked.shape[0], m.L_N_OUT: blocked.shape[1], m.L_NQ: p.codes.shape[1],
        m.L_CBT_N: p.cbt.size, m.L_S_COLS: p.scales.shape[1], m.L_M: p.m_books, m.L_D: p.d, m.L_SGQ: p.sgq,
        m.L_IN_PAD: p.n_vec * p.d,
    }  # fmt: skip
    return job_args(m.LUT_ARGS, {**{k: a.ctypes.data for k, a in addr.items()}, **sizes})


def _lut(m, p: Prepared, xp: Tensor, serial: bool) -> Tensor:
    """(b, out) float32 table-lookup result on torch's threads (see cpu_vq_numba.lut_job)."""
    b, n_blk, n_out = xp.shape[0], -(-p.codes.shape[1] // QB), p.codes.shape[0]
    n_chunks = 1 if serial else max(1, min(LUT_CHUNKS, n_blk, ACC_BYTES // (4 * b * n_out)))
    acc = torch.empty(n_chunks, b, n_out)  # one accumulator per chunk of table blocks (the job zeroes it)
    if p.lut_args is None:
        p.lut_args = _lut_template(m, p)
    args = p.lut_args.copy()
    args[m.L_X], args[m.L_ACC], args[m.L_B], args[m.L_N_CHUNKS] = xp.data_ptr(), acc.data_ptr(), b, n_chunks
    run_job(m.lut_job, m.lut_job_c, args, 1 if serial else max(1, torch.get_num_threads()))
    if n_chunks == 1:
        return acc[0]
    return torch.from_numpy(np.add.reduce(acc.numpy(), axis=0))  # chunk order: thread-count independent


def _dequant(m, p: Prepared, buf: Tensor, base: int, count: int) -> None:
    """buf[:count] = dequantized rows [base, base + count) on torch's threads."""
    if p.dequant_args is None:
        addr = {m.D_CODES: p.codes, m.D_CBF: p.cbf, m.D_QCB: p.qcb, m.D_SCALES: p.scales, m.D_SVEC: p.svec}
        sizes = {
            m.D_N_OUT: p.codes.shape[0], m.D_NQ: p.codes.shape[1], m.D_CBF_N: p.cbf.size,
            m.D_S_COLS: p.scales.shape[1], m.D_N_VEC: p.n_vec, m.D_M: p.m_books, m.D_D: p.d,
            m.D_ROWS_PER_ITEM: DEQUANT_ROWS_PER_ITEM,
        }  # fmt: skip
        p.dequant_args = job_args(m.DEQUANT_ARGS, {**{k: a.ctypes.data for k, a in addr.items()}, **sizes})
    args = p.dequant_args.copy()
    args[m.D_W], args[m.D_BASE], args[m.D_COUNT] = buf.data_ptr(), base, count
    run_job(m.dequant_job, m.dequant_job_c, args, max(1, torch.get_num_threads()))


def blas_linear(m, p: Prepared, xp: Tensor) -> Tensor:
    """x @ W^T with W dequantized in bounded row blocks (prefill)."""
    n_out, in_pad = p.codes.shape[0], p.n_vec * p.d
    rows = max(64, min(1024, BLAS_BLOCK_BYTES // (4 * in_pad)))
    buf = torch.empty(min(rows, n_out), in_pad)
    out = torch.empty(xp.shape[0], n_out)
    for base in range(0, n_out, rows):
        count = min(n_out, base + rows) - base
        _dequant(m, p, buf, base, count)
        torch.matmul(xp, buf[:count].T, out=out[:, base : base + count])
    return out


def lut_max_batch(layer) -> int:
    """Most tokens per call that take the lookup path (measured on this CPU once per process; cpu_crossover)."""
    from . import cpu_crossover

    return cpu_crossover.lut_max_tokens(NAME, layer, _lookups, dequant_blas, cap=LUT_MAX_TOKENS)


def _lookups(layer, x: Tensor) -> Tensor:
    p = prepare(layer)
    return _lut(load_numba(), p, padded_input(layer, x, p.n_vec * p.d), serial=False)


def dequant_blas(layer, x: Tensor) -> Tensor:
    """The prefill path of both CPU kernels, on a (tokens, in) input (cost-model probes)."""
    p = prepare(layer)
    return blas_linear(load_numba(), p, padded_input(layer, x, p.n_vec * p.d))


def run(layer, x: Tensor) -> Tensor:
    mod = load_numba()
    p = prepare(layer)
    xp = padded_input(layer, x, p.n_vec * p.d)
    b = xp.shape[0]
    if b > 1 and b > lut_max_batch(layer):  # one token always looks up (decoding: memory-bound)
        out = blas_linear(mod, p, xp)
    else:
        out = _lut(mod, p, xp, serial=p.codes.size * b < SERIAL_MAX_CODES)
    return finish(out, layer, x)


def describe_path(layer, x: Tensor, limit_of) -> str:
    """Which of the kernel's two paths a call takes, for ``explain`` (``limit_of``: the kernel's lut_max_batch)."""
    b = x.numel() // max(1, x.shape[-1])
    if b <= 1:
        return "table lookups (1 token: decoding always looks up)"
    limit = limit_of(layer)
    from .cpu_crossover import ENV_MAX_TOKENS, pinned_max_tokens

    source = f"pinned by {ENV_MAX_TOKENS}" if pinned_max_tokens(LUT_MAX_TOKENS) is not None else "measured on this CPU"
    if b <= limit:
        return f"table lookups ({b} tokens, at most the lookup limit {limit} {source})"
    return f"dequant + BLAS ({b} tokens, above the lookup limit {limit} {source})"


def finish(out: Tensor, layer, x: Tensor) -> Tensor:
    """(b, out) float32 result -> bias added, input's leading dims and dtype."""
    bias = layer._parameters.get("bias")
    if bias is not None:
        out += bias.detach() if bias.dtype == torch.float32 else bias.detach().float()
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out if x.dtype == torch.float32 else out.to(x.dtype)


KERNEL = Kernel(
    name=NAME,
    layer_type="VQLinear",
    device_type="cpu",
    run=run,
    supports=supports,
    priority=10,
    describe=lambda layer, x: describe_path(layer, x, lut_max_batch),
)
register_kernel(KERNEL)

__all__ = [
    "KERNEL", "NAME", "blas_linear", "blocked_codes", "compile_seconds", "dequant_blas", "describe_path", "finish",
    "import_loops",
    "load_numba", "lut_max_batch", "padded_input", "prepare", "run", "supports",
]  # fmt: skip
