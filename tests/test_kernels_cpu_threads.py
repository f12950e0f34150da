"""vqlib.kernels.cpu_threads: the CPU kernels' jobs run on torch's OpenMP team, or visibly on a pool.

The kernels (``cpu_lut_avx512`` where the CPU has it, else ``cpu_lut``; ``cpu_scalar``) are checked with 2 threads against 1 thread: every output is computed by the same
code in the same order whichever thread takes it, so the results are bitwise equal.
"""

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed (a core dependency of vqlib)")

from vqlib.kernels import cpu_lut, cpu_lut_avx512, cpu_scalar, cpu_threads  # noqa: E402

from vqlib.compress import VQLinear  # noqa: E402
from vqlib.compress.scalar import ScalarLinear  # noqa: E402


def layers_and_inputs():
    torch.manual_seed(0)
    vq = VQLinear(300, 101, vector_dim=4, num_codebooks=2, group_size=128, scale_granularity="group")
    vq.codebooks.normal_()
    vq.codes.random_(0, 256)
    scalar = ScalarLinear.from_linear(torch.nn.Linear(300, 101), bits=4, group_size=64)
    # dequant + BLAS in either kernel; at least 21 tokens: torch's matmul of fewer rows (7 here) is not bitwise
    # equal between 1 and 2 threads
    prefill = max(16, cpu_lut.lut_max_batch(vq), cpu_lut_avx512.lut_max_batch(vq)) + 5
    inputs = [torch.randn(b, 300) for b in (1, 3, 17, prefill)]
    return (vq, scalar), inputs


def outputs(layers, inputs, threads: int) -> list[torch.Tensor]:
    torch.set_num_threads(threads)  # conftest restores the thread count
    with torch.no_grad():
        return [layer(x) for layer in layers for x in inputs]


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(cpu_lut, "SERIAL_MAX_CODES", 0)  # run even these small layers on the team
    monkeypatch.setattr(cpu_scalar, "_threads", lambda work: torch.get_num_threads())


@pytest.mark.skipif(cpu_threads.openmp_team() is not None, reason=f"no OpenMP team here: {cpu_threads.openmp_team()}")
def test_jobs_run_on_torchs_openmp_team(monkeypatch, split_everything):
    layers, inputs = layers_and_inputs()
    one = outputs(layers, inputs, 1)
    real, calls = cpu_threads._find_gomp_parallel(), []

    def counting(body, args, n_threads, flags):
        calls.append(n_threads)
        real(body, args, n_threads, flags)

    monkeypatch.setattr(cpu_threads, "_gomp_parallel", counting)
    two = outputs(layers, inputs, 2)
    assert calls and set(calls) == {2}  # every multi-threaded call went through GOMP_parallel
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_pool_fallback_warns_once_and_matches(monkeypatch, split_everything):
    layers, inputs = layers_and_inputs()
    one = outputs(layers, inputs, 1)
    monkeypatch.setattr(cpu_threads, "_gomp_parallel", False)
    monkeypatch.setattr(cpu_threads, "_why_no_openmp", "test: pretend torch uses another runtime")
    monkeypatch.setattr(cpu_threads, "_warned", False)
    with pytest.warns(RuntimeWarning, match="cannot use torch's OpenMP threads \\(test: pretend") as record:
        two = outputs(layers, inputs, 2)
    assert len([w for w in record if "OpenMP" in str(w.message)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_single_thread_calls_the_job_directly(monkeypatch):
    def fail(*args):
        raise AssertionError("a one-thread call must not start a team")

    monkeypatch.setattr(cpu_threads, "_gomp_parallel", fail)
    layers, inputs = layers_and_inputs()
    assert all(torch.isfinite(y).all() for y in outputs(layers, inputs, 1))


def test_concurrent_callers_get_their_own_results(split_everything):
    """Two Python threads running layers at once (each call starts its own OpenMP team or pool work)."""
    import threading

    layers, inputs = layers_and_inputs()
    expected = outputs(layers, inputs, 1)
    torch.set_num_threads(2)
    results: dict[int, list[torch.Tensor]] = {}

    def worker(k: int) -> None:
        with torch.no_grad():
            results[k] = [layer(x) for _ in range(5) for layer in layers for x in inputs]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert len(results[k]) == 5 * len(expected)
        assert all(torch.equal(y, expected[i % len(expected)]) for i, y in enumerate(results[k]))
