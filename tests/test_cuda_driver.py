"""vqlib.kernels.cuda_driver without a GPU: a fake libcuda records what PtxModule asks of the driver (the PTX it
loads, the shared-memory opt-in, the launch's grid, block, stream and parameter pointers), so the plumbing that no
GPU has run yet is checked here; the gpu tests of test_kernels_cuda_smem.py run it for real."""

import ctypes

import pytest
import torch
from vqlib.kernels import cuda_driver
from vqlib.kernels.cuda_smem_gemv import GemvArgs


class FakeFunction:
    def __init__(self, name, lib, status=0):
        self.name, self.lib, self.status = name, lib, status
        self.argtypes = None

    def __call__(self, *args):
        self.lib.calls.append((self.name, args))
        if self.name == "cuDriverGetVersion":
            args[0]._obj.value = self.lib.version
        if self.name == "cuGetErrorName":
            args[1]._obj.value = b"CUDA_ERROR_INVALID_VALUE"
        if self.name == "cuLaunchKernel":  # the driver reads the parameters during the call: so does the fake
            params = ctypes.cast(args[9], ctypes.POINTER(ctypes.c_void_p))
            self.lib.launched.append(ctypes.cast(params[0], ctypes.POINTER(GemvArgs)).contents.n)
        return self.status


class FakeLibcuda:
    def __init__(self, version=12080, fail=()):
        self.version, self.fail, self.calls, self.launched = version, fail, [], []

    def __getattr__(self, name):
        fn = FakeFunction(name, self, 700 if name in self.fail else 0)
        setattr(self, name, fn)
        return fn


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibcuda()
    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", lambda name: lib)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"cuda_stream": 1234})())
    return lib


def test_module_loads_the_ptx_lowered_for_a_cuda12_driver(fake):
    cuda_driver.PtxModule("//\n.version 9.0\n.target sm_80\n", "k.ptx")
    name, args = next(c for c in fake.calls if c[0] == "cuModuleLoadData")
    assert ctypes.cast(args[1], ctypes.c_char_p).value == b"//\n.version 8.0\n.target sm_80\n"


def test_launch_passes_grid_block_stream_and_the_argument_struct(fake):
    module = cuda_driver.PtxModule(".version 9.0\n", "k.ptx")
    args = GemvArgs(n=4096, nv=512, copies=8)
    for _ in range(2):
        module.launch("vq_k", (64, 4), 256, 65544, [args])
    names = [c[0] for c in fake.calls]
    assert names.count("cuModuleGetFunction") == 1  # looked up once
    assert names.count("cuFuncSetAttribute") == 1  # 64 KB > 48 KB: opted in once for this kernel
    attr = next(a for n, a in fake.calls if n == "cuFuncSetAttribute")
    assert attr[1:] == (cuda_driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 65544)
    _, launch = next(c for c in fake.calls if c[0] == "cuLaunchKernel")
    assert launch[1:8] == (64, 4, 1, 256, 1, 1, 65544) and launch[8].value == 1234
    assert fake.launched == [4096, 4096]  # parameter 0 points at the struct, as the kernel's by-value argument


def test_small_shared_memory_needs_no_opt_in(fake):
    cuda_driver.PtxModule(".version 9.0\n").launch("vq_k", (1, 1), 256, 0, [GemvArgs()])
    assert "cuFuncSetAttribute" not in [c[0] for c in fake.calls]


def test_driver_errors_are_named(fake):
    fake.fail = ("cuModuleLoadData",)
    with pytest.raises(
        cuda_driver.CudaDriverError, match=r"cuModuleLoadData\(k.ptx\) failed: CUDA_ERROR_INVALID_VALUE"
    ):
        cuda_driver.PtxModule(".version 9.0\n", "k.ptx")


def test_old_driver_is_refused_with_its_version(fake):
    fake.version = 11080
    with pytest.raises(cuda_driver.CudaDriverError, match="CUDA 12 or newer driver, got version 11080"):
        cuda_driver.PtxModule(".version 9.0\n")
