"""benchmarks/bench_gather_gpu.py off the GPU: its probe kernel, run by the Triton interpreter on CPU tensors, gathers
exactly the entries its reference draws (the GPU run measures its speed once, in benchmarks/gpu_check.sh)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from vqlib.kernels import triton_vq_ops as ops  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gather_gpu.py"


@pytest.fixture(scope="module")
def probe():
    """The script imported with TRITON_INTERPRET=1 (read by @triton.jit at decoration time)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("bench_gather_gpu_interpreted", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("entries,d,dtype", [(256, 4, torch.int8), (64, 8, torch.float16)])
def test_probe_sums_the_entries_its_codes_pick(probe, entries, d, dtype):
    gen = torch.Generator().manual_seed(entries)
    codebook = torch.randint(-100, 100, (entries, d), generator=gen).to(dtype)
    with ops._interpreter_sandbox():  # the interpreter's patches of triton.language must not outlive the launch
        out = probe.launch(codebook, programs=3, iters=2)
    expected = probe.reference(codebook, programs=3, iters=2)
    assert torch.equal(out.double(), expected)  # integer-valued entries: exact in float32
    assert len(set(out.tolist())) == 3  # each program draws its own codes


def test_probe_refuses_non_power_of_two_codebooks(probe):
    with pytest.raises(ValueError, match=r"powers of two, got \(100, 4\)"):
        probe.launch(torch.zeros(100, 4), programs=1, iters=1)


def test_probe_needs_cuda(probe, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot be shown")
    assert probe.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
