"""Triton kernels for ``VQLinear`` (and ``FusedVQLinear``) on CUDA, in the ``vqlib.kernels`` registry.

Importing this module never fails: without triton or without a CUDA device it registers nothing
and ``unavailable_reason()`` says why. With both, it registers three kernels per layer type; the
registry takes the highest priority one whose ``supports`` answers None, so the path is chosen by
the number of tokens (rows of ``x``), and ``vqlib.kernels.explain(layer, x)`` names it:

=========================  =====================================  ==========================
kernel (priority)          runs                                   when
=========================  =====================================  ==========================
``triton_vq_gemv`` (30)    CUDA cores, all rows in one program,   tokens <= GEMV_MAX_BATCH
                           split-K
``triton_vq_gemm`` (20)    decoded tiles x activations on tensor  tokens < DEQUANT_MATMUL_MIN_BATCH
                           cores (``tl.dot``), split-K
``triton_vq_dequant_matmul``  decode kernel -> dense weight in x's  tokens >= DEQUANT_MATMUL_MIN_BATCH
(10)                       dtype, then cuBLAS                     (or the others unavailable)
=========================  =====================================  ==========================

The crossover ``DEQUANT_MATMUL_MIN_BATCH`` is a default until measured on a GPU:
``benchmarks/bench_kernels_gpu.py`` reports, per shape and format, the smallest batch where
decode-then-cuBLAS beats the fused tensor-core kernel; set the constant from that.
Split-K reductions are two-stage (fp32 partials, then a fixed-order sum kernel): deterministic,
no atomics, no zero-initialisation, CUDA-graph safe.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from torch import Tensor, nn

from . import Kernel, register_kernel

logger = logging.getLogger("vqlib.kernels")

GEMV_MAX_BATCH = 4
DEQUANT_MATMUL_MIN_BATCH = 256  # default crossover (tokens); measured per GPU by the benchmark
MAX_VECTOR_DIM = 64  # VQConfig's limit; every valid format is covered
_INT32 = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be registered here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def tokens(x: Tensor) -> int:
    """Rows of x seen by the kernels (all leading dims flattened)."""
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def format_reason(layer: nn.Module, x: Tensor) -> str | None:
    """Why the kernels cannot run this layer on this input (None: they can)."""
    if x.dtype not in _DTYPES:
        return f"input dtype {x.dtype} not covered (float16, bfloat16, float32)"
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        return f"input shape {tuple(x.shape)} does not end in in_features={layer.in_features}"
    if layer.codes.device != x.device:
        return f"layer on {layer.codes.device}, input on {x.device}"
    if layer.vector_dim > MAX_VECTOR_DIM:
        return f"vector_dim={layer.vector_dim} above {MAX_VECTOR_DIM}"
    n = tokens(x)
    if n == 0:
        return "empty input"
    sizes = (layer.codes.numel(), layer.codebooks.numel(), n * layer.in_features, n * layer.out_features)
    if max(sizes) > _INT32:
        return "a tensor exceeds int32 element offsets"
    return None


def _gemv_supports(layer: nn.Module, x: Tensor) -> str | None:
    why = format_reason(layer, x)
    if why is None and tokens(x) > GEMV_MAX_BATCH:
        why = f"{tokens(x)} tokens above the CUDA-core GEMV limit GEMV_MAX_BATCH={GEMV_MAX_BATCH}"
    return why


def _gemm_supports(layer: nn.Module, x: Tensor) -> str | None:
    why = format_reason(layer, x)
    if why is None and tokens(x) >= DEQUANT_MATMUL_MIN_BATCH:
        why = (
            f"{tokens(x)} tokens at or above the decode-then-cuBLAS crossover "
            f"DEQUANT_MATMUL_MIN_BATCH={DEQUANT_MATMUL_MIN_BATCH}"
        )
    return why


def op_args(layer: nn.Module) -> tuple:
    """A layer's format tensors and integers in ``vqlib::vq_linear`` argument order (after x)."""
    return (
        layer.codes,
        layer.codebooks,
        layer.codebook_scales,
        layer.scales,
        layer.bias,
        getattr(layer, "rowset", None),
        layer.in_features,
        layer.vector_dim,
        layer.group_size or 0,
        layer.scale_group_size if layer.scale_granularity == "group" else 0,
    )


def _runner(path: str):
    def run(layer: nn.Module, x: Tensor) -> Tensor:
        return torch.ops.vqlib.vq_linear(x, *op_args(layer), path)

    run.__name__ = f"run_{path}"
    return run


def kernel_entries(device_type: str = "cuda", layer_type: str = "VQLinear") -> list[Kernel]:
    """The three registry entries (tests build ``device_type="cpu"`` ones to drive the interpreter)."""
    suffix = "" if layer_type == "VQLinear" else "_fused"
    return [
        Kernel(f"triton_vq_gemv{suffix}", layer_type, device_type, _runner("gemv"), _gemv_supports, 30),
        Kernel(f"triton_vq_gemm{suffix}", layer_type, device_type, _runner("gemm"), _gemm_supports, 20),
        Kernel(
            f"triton_vq_dequant_matmul{suffix}", layer_type, device_type, _runner("dequant_matmul"), format_reason, 10
        ),
    ]


def _register() -> None:
    why = unavailable_reason()
    if why is not None:
        logger.debug("vqlib.kernels: Triton VQLinear kernels not registered (%s)", why)
        return
    try:
        from . import triton_vq_ops  # noqa: F401  (imports triton; defines the vqlib:: custom ops)
    except Exception as exc:  # noqa: BLE001 - a broken triton install must not break `import vqlib`
        warnings.warn(
            f"vqlib.kernels: Triton VQLinear kernels unavailable ({type(exc).__name__}: {exc}); "
            "VQLinear on CUDA runs the reference path (dequantize + F.linear)",
            RuntimeWarning,
            stacklevel=2,
        )
        return

    for layer_type in ("VQLinear", "FusedVQLinear"):
        for kernel in kernel_entries("cuda", layer_type):
            register_kernel(kernel)


_register()
