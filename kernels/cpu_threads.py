"""Run a compiled job on torch's own OpenMP threads (or, failing that, on a Python thread pool).

Why OpenMP: torch's CPU ops run on an OpenMP team whose worker threads keep spinning for a while
after each op. A kernel that hands its work to threads of its own (a Python pool) competes with those
spinners for the same cores: on the 2-core test machine a 4096x4096 batch-1 layer took 1.9 ms with
two pool threads against 1.1 ms on OpenMP's team (`benchmarks/bench_kernels_cpu.py`). So the jobs run
through libgomp's ``GOMP_parallel`` entry point (what ``#pragma omp parallel`` compiles to), in the
libgomp that torch itself loaded: same threads, no extra wake-ups, and torch's thread count.

A job is a pair (``job``: ``@njit`` function of one int64 array, ``body``: the same as a C function
``void(void *)``); see ``numba_threads``. When torch's runtime is not libgomp (other builds or
platforms), the same ``job`` runs on a Python thread pool, and the first such call warns once.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

_gomp_parallel = None  # ctypes function, or False once found missing
_why_no_openmp = ""
_POOL: ThreadPoolExecutor | None = None
_warned = False


def _find_gomp_parallel():
    """torch's ``GOMP_parallel`` (only if torch's parallel backend is OpenMP and its libgomp is loaded)."""
    global _gomp_parallel, _why_no_openmp
    if _gomp_parallel is None:
        _gomp_parallel = False
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            _why_no_openmp = "torch's parallel backend is not OpenMP"
            return None
        try:  # RTLD_NOLOAD: only the copy already in the process (torch's), never a second runtime
            lib = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
            fn = lib.GOMP_parallel
        except (OSError, AttributeError) as exc:
            _why_no_openmp = f"torch's libgomp is not loaded in this process ({exc})"
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        _gomp_parallel = fn
    return _gomp_parallel or None


def openmp_team() -> str | None:
    """None when jobs run on torch's OpenMP threads, otherwise why they do not."""
    return None if _find_gomp_parallel() else _why_no_openmp


def job_args(n_fields: int, values: dict[int, int]) -> np.ndarray:
    """An int64 job-argument array: ``values`` by field position, then the work counter's slot (0)."""
    args = np.zeros(n_fields + 1, np.int64)
    for field_, value in values.items():
        args[field_] = value
    return args


def run_job(job, body, args: np.ndarray, n_threads: int) -> None:
    """Run ``job(args)`` on ``n_threads`` threads (the calling thread included) and wait for all.

    ``args`` (int64, packed by the caller) and every buffer it points to must stay alive until this
    returns; the job takes its work items off a counter inside ``args``.
    """
    if n_threads <= 1:
        job(args)
        return
    gomp_parallel = _find_gomp_parallel()
    if gomp_parallel is not None:
        gomp_parallel(body.address, args.ctypes.data, n_threads, 0)  # ctypes releases the GIL
        return
    _run_on_pool(job, args, n_threads)


def _run_on_pool(job, args: np.ndarray, n_threads: int) -> None:
    global _POOL, _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"vqlib.kernels: the CPU kernels cannot use torch's OpenMP threads ({_why_no_openmp}); they run "
            "on a Python thread pool instead, which measured up to 1.7x slower per layer with 2 threads",
            RuntimeWarning,
            stacklevel=3,
        )
    if _POOL is None or _POOL._max_workers < n_threads - 1:
        _POOL = ThreadPoolExecutor(max_workers=n_threads - 1, thread_name_prefix="vqlib-cpu")
    futures = [_POOL.submit(job, args) for _ in range(n_threads - 1)]  # numba jobs release the GIL
    job(args)
    for f in futures:
        f.result()


__all__ = ["job_args", "openmp_team", "run_job"]
