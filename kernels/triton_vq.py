"""Triton kernels for ``VQLinear`` (and ``FusedVQLinear``) on CUDA, in the ``vqlib.kernels`` registry.

Importing this module never fails: without triton or without a CUDA device it registers nothing
and ``unavailable_reason()`` says why. With both, it registers three Triton kernels per layer type (and for ``VQLinear`` a CUDA C++ one), and
``vqlib.kernels.explain(layer, x)`` names the one a call takes and why the others declined:

=============================  ============================================  =========================
kernel (priority)              runs                                          tokens (rows of ``x``)
=============================  ============================================  =========================
``triton_vq_gemv`` (30)        CUDA cores, all rows in one program, split-K  1..GEMV_MAX_BATCH
``triton_vq_gemm`` (20)        decoded tiles x activations on tensor cores   any
                               (``tl.dot``), split-K
``triton_vq_dequant_matmul``   decode kernel -> dense weight in x's dtype,   any
(10)                           then cuBLAS
``cuda_vq_smem_gemv`` (5)      CUDA C++, codebooks in shared memory          1..8 (VQLinear only;
                               (``cuda_smem_gemv``); only where measured     see its format_reason)
                               faster on this GPU
``cuda_vq_smem_mma`` (4)       the same decode into tensor-core fragments    1..16 (as above)
                               (``cuda_smem_mma``); only where measured
                               faster on this GPU
=============================  ============================================  =========================

Among the paths built for a call's token count, the fastest on this device runs: measured at the first eager
call per (layer shape, format, dtype, tokens rounded up to a power of two) by ``triton_crossover``. Where
nothing can be measured (torch.compile tracing or CUDA-graph capture before any eager call, the interpreter,
``VQLIB_TRITON_TUNING=off``) the default rule applies: GEMV up to GEMV_MAX_BATCH tokens, decode-then-cuBLAS
from DEQUANT_MATMUL_MIN_BATCH, the tensor-core kernel between; the reason names the rule.
Split-K reductions are two-stage (fp32 partials, then a fixed-order sum kernel): deterministic,
no atomics, no zero-initialisation, CUDA-graph safe.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch
from torch import Tensor, nn

from . import Kernel, register_kernel, triton_crossover

logger = logging.getLogger("vqlib.kernels")

GEMV_MAX_BATCH = 4  # most tokens the GEMV is built for (it holds every token row of a program in registers)
DEQUANT_MATMUL_MIN_BATCH = 256  # default crossover (tokens), used where nothing was measured (triton_crossover)
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


def kernel_name(path: str, layer: nn.Module) -> str:
    """Registry name of ``path``'s kernel for this layer's type."""
    return kernel_name_for(path, type(layer).__name__)


# vqlib::vq_linear path -> registry name of its kernel (for VQLinear; "_fused" appended for FusedVQLinear)
KERNEL_NAMES = {
    "gemv": "triton_vq_gemv",
    "gemm": "triton_vq_gemm",
    "dequant_matmul": "triton_vq_dequant_matmul",
    "smem_gemv": "cuda_vq_smem_gemv",
    "smem_mma": "cuda_vq_smem_mma",
}
_PATHS_OF = {name: path for path, name in KERNEL_NAMES.items()}
# CUDA C++ paths (PTX through the driver, not Triton) -> their module in vqlib.kernels. Each has MAX_TOKENS,
# format_reason(layer, x), tile_candidates(layer, x), Tile (a plan variant: decode/encode/describe) and
# linear(*op args, tile).
CUDA_CPP_PATHS = ("smem_gemv", "smem_mma")


def cuda_cpp_module(path: str):
    """The module of a CUDA C++ path (a plain import: dynamo traces this while compiling a model)."""
    from . import cuda_smem_gemv, cuda_smem_mma

    return {"smem_gemv": cuda_smem_gemv, "smem_mma": cuda_smem_mma}[path]


def kernel_name_for(path: str, layer_type: str) -> str:
    return KERNEL_NAMES[path] + ("" if layer_type == "VQLinear" else "_fused")


def path_of(kernel: str) -> str | None:
    """The ``vqlib::vq_linear`` path of a registry kernel name (inverse of ``kernel_name``), None for others
    ("reference", the CPU kernels)."""
    return _PATHS_OF.get(kernel.removesuffix("_fused"))


def path_format_reason(path: str, layer: nn.Module, x: Tensor) -> str | None:
    """What of this format or input ``path``'s kernel does not cover, beyond ``format_reason`` (None: nothing)."""
    if path in CUDA_CPP_PATHS:
        return cuda_cpp_module(path).format_reason(layer, x)
    return None


def path_reason(path: str, layer: nn.Module, x: Tensor) -> str | None:
    """Why ``path`` does not run this call (None: it does): the format, its token limit, or a faster usable path
    (measured on this device per shape, format, dtype and token bucket; see ``triton_crossover``)."""
    why = format_reason(layer, x)
    if why is not None:
        return why
    n = tokens(x)
    if path == "gemv" and n > GEMV_MAX_BATCH:
        return f"{n} tokens above the CUDA-core GEMV limit GEMV_MAX_BATCH={GEMV_MAX_BATCH}"
    why = path_format_reason(path, layer, x)
    if why is not None:
        return why
    from vqlib.kernels import kernel_name_usable

    ranked = triton_crossover.ranking(layer, x, n)
    for faster in ranked.paths[: ranked.paths.index(path)] if path in ranked.paths else ():
        if kernel_name_usable(kernel_name(faster, layer)):
            return ranked.why_not(path, faster, n)
    return None


def path_description(path: str, layer: nn.Module, x: Tensor) -> str:
    """Why ``path`` runs this call (it was measured fastest, or the default rule chose it)."""
    ranked = triton_crossover.ranking(layer, x, tokens(x))
    return ranked.why_chosen(path)


def _supports(path: str):
    def supports(layer: nn.Module, x: Tensor) -> str | None:
        return path_reason(path, layer, x)

    supports.__name__ = f"{path}_supports"
    return supports


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
        return _bind(path)(layer, x)(layer, x)

    run.__name__ = f"run_{path}"
    return run


def _bind(path: str):
    def bind(layer: nn.Module, x: Tensor):
        """``run`` with the measured tile plan of this call's shape, format, dtype and token bucket (None: the
        path's default plan), looked up once per memoized registry decision rather than on every token."""
        tile = triton_crossover.ranking(layer, x, tokens(x)).tile(path)

        def run(layer: nn.Module, x: Tensor) -> Tensor:
            return torch.ops.vqlib.vq_linear(x, *op_args(layer), path, tile)

        return run

    bind.__name__ = f"bind_{path}"
    return bind


def kernel_entries(device_type: str = "cuda", layer_type: str = "VQLinear") -> list[Kernel]:
    """The registry entries: three Triton paths, and for VQLinear the CUDA C++ shared-memory GEMV (tests build
    ``device_type="cpu"`` ones to drive the Triton interpreter and the CUDA emulator)."""
    priorities = {"gemv": 30, "gemm": 20, "dequant_matmul": 10}  # the measured ranking decides; see path_reason
    if layer_type == "VQLinear":
        priorities |= {"smem_gemv": 5, "smem_mma": 4}  # asked last: they run only where ranked first (path_reason)
    return [
        Kernel(
            kernel_name_for(path, layer_type),
            layer_type,
            device_type,
            _runner(path),
            _supports(path),
            priority,
            describe=lambda layer, x, path=path: path_description(path, layer, x),
            bind=_bind(path),
        )
        for path, priority in priorities.items()
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
