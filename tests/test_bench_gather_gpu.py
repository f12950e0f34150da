"""benchmarks/bench_gather_gpu.py off the GPU: its probe kernel, run by the Triton interpreter on CPU tensors, gathers
exactly the entries its reference draws (the GPU run measures its speed once, in benchmarks/gpu_check.sh)."""

import importlib.util
import os
import re
import shutil
import subprocess
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


# ---- the shared-memory probe (CUDA C++ shipped as PTX, launched through the driver on the GPU) ----------------
def _code_lines(ptx: str) -> list[str]:
    return [line for line in ptx.splitlines() if line.strip() and not line.lstrip().startswith("//")]


def test_shipped_ptx_is_built_from_the_cuda_source(probe, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here: the shipped PTX cannot be rebuilt")
    fresh = tmp_path / "fresh.ptx"
    source = probe.PTX.with_suffix(".cu")
    subprocess.run([nvcc, "-arch=compute_80", "-ptx", str(source), "-o", str(fresh)], check=True)
    assert _code_lines(fresh.read_text()) == _code_lines(probe.PTX.read_text()), "regenerate: see the .cu's header"


def test_shipped_ptx_assembles_for_sm90_under_a_cuda12_driver(probe, tmp_path):
    """What a CUDA 12 driver JIT-compiles (the version line lowered): Triton's bundled ptxas (CUDA 12.8) assembles
    it for the H100/H200 with one shared-memory load per gathered entry and no spills."""
    cc = pytest.importorskip("vqlib.kernels.triton_compile_check")
    ptx = probe.ptx_for_driver(probe.PTX.read_text(), 12080)
    (tmp_path / "p.ptx").write_text(ptx)
    res = subprocess.run(
        [cc._ptxas_path(90), "-v", "--gpu-name=sm_90", str(tmp_path / "p.ptx"), "-o", str(tmp_path / "p.o")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stdout + res.stderr)]
    assert len(spills) == 3 and not any(spills), res.stdout + res.stderr  # three kernels, none spills
    loads = sorted(set(re.findall(r"ld\.shared(?:\.v\d)?\.u32", ptx)))
    assert loads == ["ld.shared.u32", "ld.shared.v2.u32", "ld.shared.v4.u32"]  # one instruction per entry kind


def test_ptx_version_for_the_driver(probe):
    ptx = "//\n.version 9.0\n.target sm_80\n"
    assert probe.ptx_for_driver(ptx, 13000) == ptx
    assert probe.ptx_for_driver(ptx, 12040) == "//\n.version 8.0\n.target sm_80\n"
    with pytest.raises(RuntimeError, match="CUDA 12 or newer driver, got version 11080"):
        probe.ptx_for_driver(ptx, 11080)


def test_smem_reference_follows_the_cuda_source(probe):
    """Thread t's slot s starts its LCG at t * SLOTS + s (gather_probe_smem.cu); checked against a plain loop."""
    codebook = torch.arange(16 * 4, dtype=torch.float32).reshape(16, 4)
    got = probe.smem_reference(codebook, blocks=1, iters=2)
    t = 5
    total = 0.0
    for s in range(probe.SMEM_SLOTS):
        state = t * probe.SMEM_SLOTS + s
        for _ in range(2):
            state = (state * probe.LCG_A + probe.LCG_C) % 2**32
            total += float(codebook[(state >> 16) % 16].sum())
    assert got.shape == (probe.SMEM_THREADS,) and got[t].item() == total
