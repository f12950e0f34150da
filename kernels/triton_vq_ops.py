"""Launchers and PyTorch custom ops for the Triton VQLinear kernels (imports triton).

Custom ops (``torch.library.custom_op``, with fake implementations, so ``torch.compile(fullgraph=True)``
and CUDA graphs capture them; no host synchronisation, tile choices depend on shapes only):

- ``vqlib::vq_linear(x, codes, codebooks, codebook_scales, scales, bias, rowset, in_features,
  vector_dim, group_size, scale_group_size, path) -> (..., out)`` with ``path`` one of
  ``"gemv"`` (CUDA cores, batch <= 4), ``"gemm"`` (tensor cores) or ``"dequant_matmul"``
  (decode kernel into a dense weight + ``torch.matmul``). ``group_size`` / ``scale_group_size``
  0 mean "no codebook groups" / "row scales"; ``rowset`` (out,) int32 or None names each row's
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
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import triton
from torch import Tensor
from vqlib.kernels import KernelBuildError

from . import triton_vq_jit as _native_jit

# ---- tile plans (one place; the GPU benchmark measures them) ------------------------------------
MAX_SPLIT_K = 16
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM
MIN_ITERS_PER_SPLIT = 4  # ... but keep at least this many K iterations in each split


@dataclass(frozen=True)
class TilePlan:
    block_b: int
    block_n: int
    block_v: int
    split_k: int = 1
    vec_per_split: int = 0  # 0: all vectors in one split
    num_warps: int = 4
    num_stages: int = 2
    swap_ab: bool = False  # gemm: weight rows on the MMA's M side (skinny token counts)
    prefetch: bool = False  # gemv: load the next tile's codes before decoding this one

    def encode(self) -> list[int]:
        """The plan as the ``tile`` argument of ``vqlib::vq_linear`` (ints: a custom op takes no dataclass)."""
        return [getattr(self, f.name) if f.type != "bool" else int(getattr(self, f.name)) for f in fields(self)]

    def describe(self) -> str:
        rows = f"{self.block_n} rows x {self.block_v} vectors" + (
            f" x {self.block_b} tokens" if self.block_b > 1 else ""
        )
        extras = [f"{self.num_warps} warps", f"split-K {self.split_k}"]
        extras += ["swap-AB"] * self.swap_ab + ["prefetch"] * self.prefetch
        return f"tiles of {rows}, " + ", ".join(extras)

    @classmethod
    def decode(cls, tile: list[int]) -> TilePlan:
        names = [f.name for f in fields(cls)]
        if len(tile) != len(names):
            raise ValueError(f"vq_linear: tile must hold {len(names)} ints ({', '.join(names)}), got {list(tile)}")
        return cls(**{f.name: bool(v) if f.type == "bool" else int(v) for f, v in zip(fields(cls), tile)})


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _with_split(
    plan: TilePlan,
    row_blocks: int,
    nv: int,
    device: torch.device,
    sms: int | None,
    programs_per_sm: int = PROGRAMS_PER_SM,
    min_iters: int = MIN_ITERS_PER_SPLIT,
) -> TilePlan:
    """Split the vector (K) loop so that tall or wide layers still launch enough programs."""
    if sms is None:
        index = (
            device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
        )
        sms = _sm_count(index) if device.type == "cuda" else 1
    want = math.ceil(programs_per_sm * sms / max(1, row_blocks))
    most = max(1, nv // (plan.block_v * min_iters))
    split = max(1, min(want, most, MAX_SPLIT_K))
    return split_plan(plan, split, nv)


def split_plan(plan: TilePlan, split: int, nv: int) -> TilePlan:
    """``plan`` with the vectors cut into ``split`` ranges of whole BLOCK_V tiles (none empty)."""
    per = math.ceil(math.ceil(nv / max(1, split)) / plan.block_v) * plan.block_v
    return replace(plan, split_k=math.ceil(nv / per), vec_per_split=per)


def plan_tiles(
    path: str, batch: int, n: int, nv: int, dp: int, device: torch.device, sms: int | None = None, elem_bytes: int = 2
) -> TilePlan:
    """Default tiles for ``path`` (shape-based only, so a captured graph replays the same launch).
    ``sms`` (streaming multiprocessors) defaults to the device's; 1 on CPU (interpreter).
    ``elem_bytes`` 4 (float32 activations) shrinks the large GEMM tiles, which spill registers otherwise."""
    if path == "gemv":
        block_b = _pow2(batch)
        cols = 128 if block_b <= 2 else 64  # bound the (B, N, K) product held in registers
        plan = TilePlan(block_b, 32, max(1, cols // dp))
    elif path == "gemm" and batch <= 16:
        # swap_ab: weight rows fill the MMA's 64-row side (sm_90 wgmma; without it a 16-token tile
        # compiles to mma.sync), tokens its 16-wide side
        plan = TilePlan(16, 64, max(1, 64 // dp), num_stages=3, swap_ab=True)
    elif path == "gemm":
        block_b = 32 if batch <= 32 else 64 if batch <= 64 else 128
        plan = TilePlan(
            block_b, 128, max(1, 32 // dp), num_warps=8 if block_b == 128 else 4, num_stages=3, swap_ab=block_b <= 32
        )
        if elem_bytes > 2:  # float32: an IEEE fp32 dot runs on FMA units with large register tiles
            plan = replace(plan, block_b=min(block_b, 32), block_n=64, num_warps=4, swap_ab=False)
    elif path == "dequant":
        return TilePlan(1, 32, max(1, 64 // dp))
    else:
        raise ValueError(f"plan_tiles: expected path 'gemv', 'gemm' or 'dequant', got {path!r}")
    row_blocks = math.ceil(n / plan.block_n) * math.ceil(batch / plan.block_b)
    return _with_split(plan, row_blocks, nv, device, sms)


@dataclass(frozen=True)
class GemvVariant:
    """How a GEMV candidate differs from the default plan (None: keep the default's value)."""

    programs_per_sm: int  # split-K until about this many programs per SM
    prefetch: bool = False
    rows: int | None = None  # BLOCK_N
    width: int = 1  # BLOCK_V as a multiple of the default's
    warps: int | None = None


# Batch 1 is latency-bound unless ~30 KB of codes per SM are in flight (Little's law at H200 bandwidth and DRAM
# latency): more programs (split-K), larger tiles and the prefetch each add bytes in flight, at a cost in registers
# and in split-K partial sums. Which mix wins depends on the GPU and the shape, so the GPU measures
# (triton_crossover); these are the candidates.
GEMV_VARIANTS = (
    GemvVariant(8),
    GemvVariant(8, prefetch=True),
    GemvVariant(32, prefetch=True),
    GemvVariant(8, prefetch=True, rows=64, warps=4),
    GemvVariant(8, prefetch=True, width=2, warps=8),
)
GEMM_PROGRAMS_PER_SM = (8,)  # GEMM candidates: the default plan split deeper (its loads are pipelined by Triton)


def tile_candidates(
    path: str, batch: int, n: int, nv: int, dp: int, device: torch.device, sms: int | None = None, elem_bytes: int = 2
) -> list[TilePlan]:
    """The tile plans the measured choice times for ``path``, the default (``plan_tiles``) first, no duplicates.
    Shapes only (no data), so a CUDA graph or compiled graph replays the plan chosen eagerly."""
    default = plan_tiles(path, batch, n, nv, dp, device, sms, elem_bytes)
    if path == "gemv":
        variants = [
            (
                replace(
                    default,
                    block_n=v.rows or default.block_n,
                    block_v=default.block_v * v.width,
                    num_warps=v.warps or default.num_warps,
                    prefetch=v.prefetch,
                ),
                v.programs_per_sm,
            )
            for v in GEMV_VARIANTS
        ]
    elif path == "gemm":
        variants = [(default, pps) for pps in GEMM_PROGRAMS_PER_SM]
    else:
        variants = []  # dequant: one plan
    plans = [default]
    for plan, pps in variants:
        row_blocks = math.ceil(n / plan.block_n) * math.ceil(batch / plan.block_b)
        plan = _with_split(plan, row_blocks, nv, device, sms, pps, min_iters=2)  # deeper splits, shorter loops
        if plan not in plans:
            plans.append(plan)
    return plans


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
