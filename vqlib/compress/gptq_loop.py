"""The GPTQ column loop of one lazy-update block, compiled (numba) for one codebook on CPU.

Same arithmetic as ``calibrated._ColumnLoop.quantize_block``'s torch loop, without its ~20 small
torch ops per vector; the nearest code is found with exact squared distances (``vqlib.core.lloyd``),
so near-ties may round the other way. Rows are split across torch's OpenMP threads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vqlib.core.numba_loops import load_loops

ROWS_PER_ITEM = 32
MAX_CODES = 1024  # the per-vector distance scan is a loop over the codebook; larger ones take the torch path
_FALLBACK = "the GPTQ column loop runs as torch ops (slower per vector)"


def compiled_loop_applies(w: Tensor, codebooks: Tensor) -> bool:
    """One codebook (M = 1), at most MAX_CODES entries, float32 CPU tensors, and the loop compiled."""
    _, m, k, _ = codebooks.shape  # (G, M, K, d)
    if m != 1 or k > MAX_CODES or w.device.type != "cpu":
        return False
    if w.dtype != torch.float32 or codebooks.dtype != torch.float32:  # the loop reads float32 memory
        return False
    return _load() is not None


def _load():
    return load_loops("vqlib.compress.gptq_numba", _warm_up, _FALLBACK)


def _warm_up(mod) -> None:
    gen = np.random.default_rng(0)
    arrays = _arrays(
        gen.standard_normal((3, 8)).astype(np.float32),
        np.ones((3, 2), np.float32),
        np.tile(np.eye(4, dtype=np.float32), (2, 1, 1)),
        gen.standard_normal((2, 5, 4)).astype(np.float32),
        np.eye(8, dtype=np.float32),
    )
    _run(mod, arrays, 1)


def quantize_block(block: Tensor, s: Tensor, t: Tensor, cb: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """GPTQ over the block's vectors; returns (mapped errors (out, nb * d), codes (out, nb) int64).

    block (out, nb * d) is corrected in place; s (out, nb) vector scales; t (nb, d, d) U_jj^-1;
    cb (nb, K, d) each vector's codebook; u (nb * d, nb * d) the block's part of U."""
    arrays = _arrays(
        block.detach().numpy(), s.contiguous().numpy(), t.contiguous().numpy(), cb.contiguous().numpy(), u.numpy()
    )
    _run(_load(), arrays, max(1, torch.get_num_threads()))
    return torch.from_numpy(arrays["errors"]), torch.from_numpy(arrays["codes"])


def _arrays(block, s, t, cb, u) -> dict[str, np.ndarray]:
    out, width = block.shape
    nb, _, d = cb.shape
    assert block.flags.c_contiguous and width == nb * d, "block must be a contiguous (out, nb * d) array"
    cbt = np.ascontiguousarray(np.matmul(cb, t).transpose(0, 2, 1))  # (nb, d, K): codebooks in the metric
    return {
        "block": block,
        "errors": np.zeros_like(block),
        "codes": np.empty((out, nb), np.int64),
        "cbt": cbt,
        "cb": np.ascontiguousarray(cb, np.float32),
        "t": np.ascontiguousarray(t, np.float32),
        "s": np.ascontiguousarray(s, np.float32),
        "u": np.ascontiguousarray(u, np.float32),
    }


def _run(mod, arrays: dict[str, np.ndarray], n_threads: int) -> None:
    from vqlib.kernels.cpu_threads import job_args, run_job  # lazy: vqlib.kernels imports vqlib.compress

    out, nb = arrays["codes"].shape
    _, d, k = arrays["cbt"].shape
    names = ("block", "errors", "codes", "cbt", "cb", "t", "s", "u")
    fields = {getattr(mod, "G_" + n.upper()): arrays[n].ctypes.data for n in names}
    fields |= {mod.G_OUT: out, mod.G_NB: nb, mod.G_D: d, mod.G_K: k, mod.G_ROWS_PER_ITEM: ROWS_PER_ITEM}
    items = -(-out // ROWS_PER_ITEM)
    run_job(mod.gptq_job, mod.gptq_job_c, job_args(mod.JOB_ARGS, fields), min(n_threads, items))
