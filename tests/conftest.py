import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # Test tensors are tiny: OpenMP thread hand-offs cost far more than the maths on a 2-core CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_registry(monkeypatch):
    """The Triton kernels registered for CPU tensors (interpreter) in an otherwise empty registry."""
    from vqlib.kernels import triton_vq as tv

    from vqlib import kernels

    monkeypatch.setattr(kernels, "_KERNELS", [])
    monkeypatch.setattr(kernels, "_BROKEN", {})
    monkeypatch.setattr(kernels, "_LOGGED", set())
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    for layer_type in ("VQLinear", "FusedVQLinear"):
        for kernel in tv.kernel_entries("cpu", layer_type):
            kernels.register_kernel(kernel)
