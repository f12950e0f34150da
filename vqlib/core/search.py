"""Exact nearest-code search that never materialises the full tokens x codes distance matrix.

Distances are computed a block of tokens at a time (``||c||^2 - 2 x.c`` through one GEMM per block,
``||x||^2`` is constant per row and does not change the argmin), so peak memory is bounded by
``max_elements`` floats whatever the codebook size. Faiss' exact search is the other backend: the
default on CPU, and on CUDA tensors when faiss-gpu is installed (its GPU brute-force k-NN).
"""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_choice

SearchBackend = Literal["auto", "torch", "faiss"]

DEFAULT_MAX_ELEMENTS = 1 << 24  # 64 MB of fp32 scores per block


@torch.no_grad()
def nearest_code(
    x: Tensor,
    codes: Tensor,
    *,
    cosine: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    backend: SearchBackend = "auto",
) -> Tensor:
    """Index of the nearest row of ``codes`` (k, d) for each row of ``x`` (n, d), as int64 (n,).

    Euclidean by default; ``cosine=True`` maximises the normalised dot product. Computed in float32.
    """
    if x.ndim != 2 or codes.ndim != 2 or x.shape[1] != codes.shape[1]:
        raise ValueError(
            f"nearest_code expects x (n, d) and codes (k, d), got {tuple(x.shape)} and {tuple(codes.shape)}"
        )
    x, codes = x.float(), codes.float()
    if cosine:
        x, codes = F.normalize(x, dim=-1), F.normalize(codes, dim=-1)
    if backend == "faiss" or (backend == "auto" and _prefer_faiss(x, codes)):
        return _faiss_search(x, codes, cosine)
    check_choice("backend", backend, SearchBackend)
    n, k = x.shape[0], codes.shape[0]
    # cosine: argmax x.c == argmin (-2 x.c); euclidean: argmin ||c||^2 - 2 x.c
    bias = torch.zeros(k, device=x.device) if cosine else codes.pow(2).sum(-1)
    codes_t = codes.t()
    rows = max(1, min(n, max_elements // max(k, 1)))
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for start in range(0, n, rows):
        block = torch.addmm(bias, x[start : start + rows], codes_t, beta=1.0, alpha=-2.0)
        out[start : start + rows] = block.argmin(dim=-1)
    return out


FAISS_GPU_MIN_CODES = 4096


def _prefer_faiss(x: Tensor, codes: Tensor) -> bool:
    # CPU: Faiss' exact search (blocked GEMM + fused argmin, see faiss_blas_path) was as fast as or faster
    # than torch's blocked GEMM + argmin at every size measured (64-65,536 codes, dims 4-256, 1,024-16,384
    # queries, 2 cores; benchmarks/bench_search.py), up to 50x at low dims. CUDA: Faiss only where a
    # faiss-gpu build can search device memory in place, for large codebooks (not yet timed on a GPU).
    if not x.is_cuda:
        return True
    return codes.shape[0] >= FAISS_GPU_MIN_CODES and faiss_has_gpu()


@functools.cache  # asked on every CUDA search; the answer cannot change within a process
def faiss_has_gpu() -> bool:
    """Whether the installed Faiss is a GPU build and sees at least one GPU."""
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@torch.compiler.disable  # Faiss is C++: under torch.compile it runs eagerly between graphs
def _faiss_search(x: Tensor, codes: Tensor, cosine: bool) -> Tensor:
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2
    if x.is_cuda and faiss_has_gpu():
        return _faiss_gpu_search(faiss, x, codes, metric)
    import numpy as np

    xq = np.ascontiguousarray(x.detach().cpu().numpy())
    xb = np.ascontiguousarray(codes.detach().cpu().numpy())
    with faiss_blas_path(faiss):
        _, idx = faiss.knn(xq, xb, 1, metric=metric)
    return torch.from_numpy(idx[:, 0].astype("int64")).to(x.device)


@contextmanager
def faiss_blas_path(faiss):
    """Make Faiss' exact search take its blocked-GEMM path for this call.

    faiss-cpu 1.15 answers a call with fewer than ``distance_compute_blas_threshold`` (128,000) queries
    query by query for low-dimensional data. Measured on 2 cores with 65,536 codes, that is 15-30x slower
    at 4-8 dims and 1,024-4,096 queries, and no faster anywhere we measured; the indices are the same.
    The threshold is a Faiss global, so it is lowered only for the duration of the call."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(old, 20)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


_GPU_RESOURCES: dict[int, object] = {}


def _faiss_gpu_search(faiss, x: Tensor, codes: Tensor, metric: int) -> Tensor:
    """Faiss' GPU brute-force k-NN (``knn_gpu``) on the tensors' own device memory, no host copy.

    ``faiss.contrib.torch_utils`` makes ``knn_gpu`` accept torch CUDA tensors; the resources object
    (scratch memory, streams) is created once per device and reused."""
    importlib.import_module("faiss.contrib.torch_utils")  # patches faiss.knn_gpu to take torch tensors

    device = x.device.index or 0  # CUDA tensors always carry their device index
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    _, idx = faiss.knn_gpu(_GPU_RESOURCES[device], x.contiguous(), codes.contiguous(), 1, metric=metric, device=device)
    return idx[:, 0].to(device=x.device, dtype=torch.long)
