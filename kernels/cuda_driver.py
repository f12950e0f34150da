"""PTX modules launched through the CUDA driver (libcuda, via ctypes): CUDA C++ kernels without a compiler on the
user's machine. vqlib ships PTX built by nvcc here; the driver compiles it for the GPU at hand when it is loaded.

Used by ``cuda_smem_gemv`` (the shared-memory codebook GEMV) and by ``benchmarks/bench_gather_gpu.py`` (its
shared-memory probe). Launches go to torch's current stream, so CUDA graphs capture them like any kernel.
"""

from __future__ import annotations

import ctypes
import lzma
import re
from pathlib import Path

import torch

CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
STATIC_SHARED_LIMIT = 48 * 1024  # dynamic shared memory a kernel gets without opting in


class CudaDriverError(RuntimeError):
    """A libcuda call failed (its error name is in the message)."""


def ptx_for_driver(ptx: str, driver_version: int) -> str:
    """nvcc 13 writes PTX ISA 9.0, which only CUDA 13 drivers load; vqlib's PTX uses nothing newer than ISA 8.0,
    which every CUDA 12 driver loads, so the version line is lowered for them (driver_version as cuDriverGetVersion)."""
    if driver_version >= 13000:
        return ptx
    if driver_version < 12000:
        raise CudaDriverError(f"vqlib's PTX kernels need a CUDA 12 or newer driver, got version {driver_version}")
    return re.sub(r"^\.version \d+\.\d+$", ".version 8.0", ptx, count=1, flags=re.M)


def read_ptx(path: Path) -> str:
    """A PTX file, or an xz-compressed one (``.xz``)."""
    return lzma.decompress(path.read_bytes()).decode() if path.suffix == ".xz" else path.read_text()


class PtxModule:
    """PTX text loaded into the current CUDA context (torch's, for the current device: create a CUDA tensor
    first); the driver compiles it for this GPU here. ``launch`` runs one of its kernels on torch's current stream."""

    def __init__(self, ptx: str, label: str = "PTX"):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaDriverError(f"cannot load the CUDA driver library libcuda.so.1 ({exc})") from exc
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p]
        self.lib.cuLaunchKernel.argtypes += [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        version = ctypes.c_int()
        self.check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        image = ptx_for_driver(ptx, version.value).encode() + b"\0"
        self.module = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(self.module), image), f"cuModuleLoadData({label})")
        self._functions: dict[str, ctypes.c_void_p] = {}
        self._shared_optin: dict[str, int] = {}

    def check(self, status: int, what: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise CudaDriverError(f"{what} failed: {(name.value or b'?').decode()} ({status})")

    def function(self, name: str) -> ctypes.c_void_p:
        if name not in self._functions:
            fn = ctypes.c_void_p()
            self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), self.module, name.encode()), name)
            self._functions[name] = fn
        return self._functions[name]

    def launch(self, name: str, grid: tuple[int, int], threads: int, smem: int, params: list) -> None:
        """Run kernel ``name`` on torch's current stream; ``params`` are ctypes objects, one per kernel argument."""
        fn = self.function(name)
        if smem > STATIC_SHARED_LIMIT and self._shared_optin.get(name, 0) < smem:
            attr = CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self.check(self.lib.cuFuncSetAttribute(fn, attr, smem), f"cuFuncSetAttribute({name}, {smem} B)")
            self._shared_optin[name] = smem
        pointers = (ctypes.c_void_p * len(params))(*[ctypes.cast(ctypes.pointer(p), ctypes.c_void_p) for p in params])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        status = self.lib.cuLaunchKernel(fn, grid[0], grid[1], 1, threads, 1, 1, smem, stream, pointers, None)
        self.check(status, f"cuLaunchKernel({name})")
