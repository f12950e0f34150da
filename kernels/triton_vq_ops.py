"""Launchers and PyTorch custom ops for the Triton VQLinear kernels (imports triton).

Custom ops (``torch.library.custom_op``, with fake implementations, so ``torch.compile(fullgraph=True)``
and CUDA graphs capture them; no host synchronisation, tile choices depend on shapes only):

- ``vqlib::vq_linear(x, codes, codebooks, codebook_scales, scales, bias, rowset, in_features,
  vector_dim, group_size, scale_group_size, path, tile) -> (..., out)`` with ``path`` one of
  ``"gemv"`` (CUDA cores, batch <= 4), ``"gemm"`` (tensor cores), ``"dequant_matmul"``
  (decode kernel into a dense weight + ``torch.matmul``), ``"smem_gemv"`` or ``"smem_mma"`` (CUDA C++,
  ``cuda_smem_gemv`` / ``cuda_smem_mma``). ``group_size`` / ``scale_group_size`` 0 mean "no codebook groups" / "row scales"; ``rowset`` (out,) int32 or None names each row's
  codebook set (fused projections).
- ``vqlib::vq_dequantize(...) -> (out, in_features)`` dense weight in the requested dtype.

On CUDA tensors the kernels are compiled; on CPU tensors they run in the Triton interpreter
(float32 only; slow; used by the CPU tests). A kernel that Triton cannot build raises
``vqlib.kernels.KernelBuildError``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from torch import Tensor
from vqlib.kernels import KernelBuildError

from . import triton_vq_jit as _native_jit

# tile plans live in triton_tiles (no triton import); re-exported for the launchers, tests and benchmarks
from .triton_tiles import (  # noqa: F401
    MAX_SPLIT_K,
    MIN_ITERS_PER_SPLIT,
    PROGRAMS_PER_SM,
    TilePlan,
    _pow2,
    plan_tiles,
    split_plan,
    tile_candidates,
)


# ---- compiled vs interpreted kernels ----------------------------------------------------------
@functools.cache
def _interpreted_jit():
    """A second copy of ``triton_vq_jit`` whose functions run in the Triton interpreter (CPU tensors)."""
    path = Path(_native_jit.__file__)
    name = "vqlib.kernels._triton_vq_jit_interpreted"
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read by @triton.jit at decoration time
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    import triton.language as tl

    for name in ("vq_gemv_kernel", "vq_gemm_kernel"):
        # the interpreter reads constexpr-ness from the (rewritten) function's annotations: a constexpr
        # ITERS is a plain int there, which its range() accepts (see triton_vq_jit's docstring)
        getattr(module, name).rewrite().__annotations__["ITERS"] = tl.constexpr
    return module


def _jit_for(device: torch.device):
    if device.type == "cuda":
        return _native_jit
    if device.type == "cpu":
        return _interpreted_jit()
    raise ValueError(f"vqlib triton kernels: expected CUDA (compiled) or CPU (interpreter) tensors, got {device}")


def _is_build_error(exc: BaseException) -> bool:
    """Triton front-end errors, resource limits, ptxas failures and MLIR pass-pipeline crashes."""
    module = type(exc).__module__ or ""
    return (
        module.startswith("triton.compiler")
        or isinstance(exc, subprocess.CalledProcessError)
        or type(exc).__name__ in ("OutOfResources", "CompilationError", "CompileTimeAssertionFailure")
        or (isinstance(exc, RuntimeError) and "PassManager::run failed" in str(exc))
    )


def _launch(kernel, grid, *args, **meta):
    try:
        kernel[grid](*args, **meta)
    except Exception as exc:  # noqa: BLE001 - only Triton build failures are re-raised as KernelBuildError
        if _is_build_error(exc):
            raise KernelBuildError(f"{getattr(kernel, '__name__', kernel)}: {type(exc).__name__}: {exc}") from exc
        raise


# ---- format constants --------------------------------------------------------------------------
def _format_meta(codes: Tensor, codebooks: Tensor, codebook_scales, scales, rowset, vector_dim, group_size, sgs):
    """Constexpr/runtime arguments shared by all kernels (see triton_vq_jit._decode_tile)."""
    n, nv, m = codes.shape
    g_total, m_cb, kcb, d = codebooks.shape
    if m_cb != m or d != vector_dim:
        raise ValueError(
            f"vq kernels: codebooks {tuple(codebooks.shape)} do not match codes {tuple(codes.shape)} / vector_dim {vector_dim}"
        )
    groups = 1 if group_size == 0 else math.ceil(nv * d / group_size)
    scale_mode = 0 if scales is None else (1 if sgs == 0 else 2)
    runtime = dict(N=n, NV=nv, S=1 if scales is None else scales.shape[1], G=groups)
    const = dict(
        D=d,
        DP=_pow2(d),
        M=m,
        MP=_pow2(m),
        KCB=kcb,
        CODE16=codes.dtype == torch.int16,
        GROUP_VECS=group_size // d,
        HAS_CBS=codebook_scales is not None,
        SCALE_MODE=scale_mode,
        SCALE_GROUP_VECS=max(1, sgs // d),
        HAS_ROWSET=rowset is not None,
    )
    ptrs = [codes, codebooks, _or(codebook_scales, codebooks), _or(scales, codebooks), _or(rowset, codes)]
    return ptrs, runtime, const


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    return dummy if t is None else t


# ---- launchers ---------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: the kernel's name in triton_vq_jit, grid, positional args, meta (constexprs
    and num_warps/num_stages). Built without touching the device (meta tensors work), so the same
    launches can be compiled ahead of time (``triton_compile_check``)."""

    kernel: str
    grid: tuple
    args: tuple
    meta: dict


def run_launches(launches: list[Launch], device: torch.device) -> None:
    jit = _jit_for(device)
    with _interpreter_sandbox() if device.type == "cpu" else contextlib.nullcontext():
        for item in launches:
            _launch(getattr(jit, item.kernel), item.grid, *item.args, **item.meta)


@contextlib.contextmanager
def _interpreter_sandbox():
    """Undo the Triton interpreter's patches of ``triton.language`` after an interpreted launch.

    Each interpreted launch rebinds attributes of triton.language, its core/math modules and its
    tensor/dtype classes to interpreter versions and never restores them; a kernel compiled for a GPU
    later in the same process (ours, or torch.compile's) then fails to build
    (``'ir.builder' object has no attribute 'get_uint8_ty'``)."""
    import triton.language as tl

    targets = [tl, tl.core, tl.math, tl.core.tensor, tl.core.dtype, tl.core.tensor_descriptor_base]
    saved = [(obj, dict(vars(obj))) for obj in targets]
    try:
        yield
    finally:
        for obj, before in saved:
            for name in [k for k in vars(obj) if k not in before]:
                delattr(obj, name)
            for name, value in before.items():
                if vars(obj).get(name, _MISSING) is not value:
                    setattr(obj, name, value)


_MISSING = object()


def dequantize_launches(
    codes,
    codebooks,
    codebook_scales,
    scales,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    dtype,
    plan: TilePlan | None = None,
) -> tuple[Tensor, list[Launch]]:
    ptrs, runtime, const = _format_meta(
        codes, codebooks, codebook_scales, scales, rowset, vector_dim, group_size, scale_group_size
    )
    plan = plan or plan_tiles("dequant", 1, runtime["N"], runtime["NV"], const["DP"], codes.device)
    out = torch.empty((runtime["N"], in_features), dtype=dtype, device=codes.device)  # (out, in)
    grid = (triton.cdiv(runtime["N"], plan.block_n), triton.cdiv(runtime["NV"], plan.block_v))
    meta = dict(**const, BLOCK_N=plan.block_n, BLOCK_V=plan.block_v, num_warps=plan.num_warps)
    return out, [Launch("vq_dequant_kernel", grid, (out, *ptrs, *runtime.values(), in_features), meta)]


def dequantize(*args, plan: TilePlan | None = None) -> Tensor:
    """Dense (out, in_features) weight in ``dtype`` (float32 here is bit-exact with the reference).
    Arguments: codes, codebooks, codebook_scales, scales, rowset, in_features, vector_dim, group_size,
    scale_group_size, dtype."""
    out, launches = dequantize_launches(*args, plan=plan)
    run_launches(launches, out.device)
    return out


def linear_launches(
    x2,
    codes,
    codebooks,
    codebook_scales,
    scales,
    bias,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    path: str,
    plan: TilePlan | None = None,
) -> tuple[Tensor, list[Launch]]:
    """x2 (batch, in) with unit last stride -> output (batch, out) and the launches that fill it."""
    batch = x2.shape[0]
    ptrs, runtime, const = _format_meta(
        codes, codebooks, codebook_scales, scales, rowset, vector_dim, group_size, scale_group_size
    )
    n, nv = runtime["N"], runtime["NV"]
    plan = plan or plan_tiles(path, batch, n, nv, const["DP"], x2.device, elem_bytes=x2.element_size())
    vps = plan.vec_per_split or math.ceil(nv / plan.block_v) * plan.block_v
    out = torch.empty((batch, n), dtype=x2.dtype, device=x2.device)
    part = torch.empty((plan.split_k, batch, n), dtype=torch.float32, device=x2.device) if plan.split_k > 1 else out
    kernel, grid, extra = _kernel_and_grid(path, plan, batch, n, x2.dtype)
    bias_ptr = _or(bias, codes)
    args = (x2, out, part, bias_ptr, *ptrs, batch, *runtime.values(), in_features, x2.stride(0), vps)
    meta = dict(
        **const,
        HAS_BIAS=bias is not None,
        BLOCK_B=plan.block_b,
        BLOCK_N=plan.block_n,
        BLOCK_V=plan.block_v,
        SPLIT=plan.split_k > 1,
        ITERS=vps // plan.block_v,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        **extra,
    )
    launches = [Launch(kernel, grid, args, meta)]
    if plan.split_k > 1:
        block = 1024
        launches.append(
            Launch(
                "splitk_reduce_kernel",
                (triton.cdiv(batch * n, block),),
                (part, out, bias_ptr, batch, n),
                dict(HAS_BIAS=bias is not None, SPLIT_K=plan.split_k, BLOCK=block),
            )
        )
    return out, launches


def fused_linear(x, *args, plan: TilePlan | None = None) -> Tensor:
    """x (..., in_features) -> (..., out) through the "gemv" or "gemm" kernel (split-K when planned).
    Arguments after x: codes, codebooks, codebook_scales, scales, bias, rowset, in_features, vector_dim,
    group_size, scale_group_size, path."""
    in_features = args[6]
    x2 = x.reshape(-1, in_features)  # (batch, in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out, launches = linear_launches(x2, *args, plan=plan)
    run_launches(launches, x.device)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _kernel_and_grid(path, plan, batch, n, dtype):
    k_blocks = plan.split_k
    if path == "gemv":
        if plan.block_b < batch:
            raise ValueError(f"gemv: expected batch <= BLOCK_B={plan.block_b}, got {batch}")
        return "vq_gemv_kernel", (triton.cdiv(n, plan.block_n), k_blocks), {"PREFETCH": plan.prefetch}
    if path == "gemm":
        grid = (triton.cdiv(batch, plan.block_b), triton.cdiv(n, plan.block_n), k_blocks)
        return "vq_gemm_kernel", grid, {"IEEE": dtype == torch.float32, "SWAP_AB": plan.swap_ab}
    raise ValueError(f"vq_linear: expected path 'gemv', 'gemm' or 'dequant_matmul', got {path!r}")


def dequant_matmul(
    x,
    codes,
    codebooks,
    codebook_scales,
    scales,
    bias,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    plan: TilePlan | None = None,
) -> Tensor:
    """Decode the dense weight in x's dtype (one kernel, ``plan`` its tiles), then cuBLAS (large batches)."""
    weight = dequantize(
        codes,
        codebooks,
        codebook_scales,
        scales,
        rowset,
        in_features,
        vector_dim,
        group_size,
        scale_group_size,
        x.dtype,
        plan=plan,
    )  # (out, in)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


# ---- custom ops --------------------------------------------------------------------------------
@torch.library.custom_op("vqlib::vq_linear", mutates_args=())
def vq_linear(
    x: Tensor,
    codes: Tensor,
    codebooks: Tensor,
    codebook_scales: Tensor | None,
    scales: Tensor | None,
    bias: Tensor | None,
    rowset: Tensor | None,
    in_features: int,
    vector_dim: int,
    group_size: int,
    scale_group_size: int,
    path: str,
    tile: list[int] | None = None,
) -> Tensor:
    """``tile``: a ``TilePlan.encode()`` (the measured choice's plan, see ``tile_candidates``), or None for the
    default plan of ``path``."""
    args = (
        x,
        codes,
        codebooks,
        codebook_scales,
        scales,
        bias,
        rowset,
        in_features,
        vector_dim,
        group_size,
        scale_group_size,
    )
    from .triton_vq import CUDA_CPP_PATHS, cuda_cpp_module

    if path in CUDA_CPP_PATHS:  # CUDA C++ (PTX through the driver), not Triton: their own plans
        return cuda_cpp_module(path).linear(*args, tile)
    plan = TilePlan.decode(tile) if tile else None
    if path == "dequant_matmul":
        return dequant_matmul(*args, plan=plan)
    return fused_linear(*args, path, plan=plan)


@vq_linear.register_fake
def _(
    x,
    codes,
    codebooks,
    codebook_scales,
    scales,
    bias,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    path,
    tile=None,
):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.custom_op("vqlib::vq_dequantize", mutates_args=())
def vq_dequantize(
    codes: Tensor,
    codebooks: Tensor,
    codebook_scales: Tensor | None,
    scales: Tensor | None,
    rowset: Tensor | None,
    in_features: int,
    vector_dim: int,
    group_size: int,
    scale_group_size: int,
    dtype: torch.dtype,
) -> Tensor:
    return dequantize(
        codes, codebooks, codebook_scales, scales, rowset, in_features, vector_dim, group_size, scale_group_size, dtype
    )


@vq_dequantize.register_fake
def _(codes, codebooks, codebook_scales, scales, rowset, in_features, vector_dim, group_size, scale_group_size, dtype):
    return codes.new_empty((codes.shape[0], in_features), dtype=dtype)
