"""vqlib.kernels.cpu_crossover: the measured cost model that sets the CPU kernels' lookup limits."""

import math

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed (a core dependency of vqlib)")

from test_kernels_cpu import random_vq  # noqa: E402
from vqlib.kernels import cpu_crossover, cpu_lut, cpu_lut_avx512  # noqa: E402
from vqlib.kernels.cpu_crossover import HostCosts  # noqa: E402

from vqlib import kernels  # noqa: E402

# Constants of the order measured on the 2-core Xeon host (2 threads, docs/kernels.md).
XEON = HostCosts(lookup_ns=0.03, table_ns=0.05, dequant_ns=0.5, mac_ns=0.006)
needs_avx512 = pytest.mark.skipif(
    cpu_lut_avx512.isa_missing() is not None, reason=f"cannot measure here: {cpu_lut_avx512.isa_missing()}"
)


def test_limit_solves_the_linear_model():
    # 4096x4096 d4 1x8: lookups 4096*1024*0.03 + tables 4096*256*0.05 = 178,258 ns per token, BLAS 100,663;
    # dequantization 8.39 ms -> 108 tokens -> 64 (powers of two only)
    assert XEON.lut_max_tokens(4096, 4096, d=4, m=1, cap=256) == 64
    weights = 4096 * 4096
    lut = 4096 * 1024 * XEON.lookup_ns + 4096 * 256 * XEON.table_ns
    exact = weights * XEON.dequant_ns / (lut - weights * XEON.mac_ns)
    assert 64 <= exact < 128


def test_limit_shrinks_with_more_lookups_per_weight():
    limits = [XEON.lut_max_tokens(4096, 4096, d, m, cap=256) for d, m in [(8, 1), (4, 1), (4, 2), (2, 2)]]
    assert limits == sorted(limits, reverse=True) and limits[0] > limits[-1]


def test_cheap_lookups_take_the_cap_and_expensive_ones_the_floor():
    zen4_like = HostCosts(lookup_ns=0.012, table_ns=0.03, dequant_ns=0.5, mac_ns=0.011)
    assert zen4_like.lut_max_tokens(4096, 4096, d=4, m=1, cap=256) == 256
    assert XEON.lut_max_tokens(64, 64, d=2, m=4, cap=256) == 1  # tables dominate a tiny layer
    assert all(math.log2(XEON.lut_max_tokens(n, 2 * n, 4, 1, cap=256)).is_integer() for n in (100, 576, 1000, 4096))


def test_pinned_limit_and_its_errors(monkeypatch):
    monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, "24")
    assert cpu_crossover.pinned_max_tokens(256) == 24
    assert cpu_lut_avx512.lut_max_batch(random_vq(d=4, m=1)) == 24
    for bad in ("0", "-3", "abc", "257"):
        monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, bad)
        with pytest.raises(ValueError, match=f"{cpu_crossover.ENV_MAX_TOKENS}.*1 to 256.*{bad}"):
            cpu_crossover.pinned_max_tokens(256)
    monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, "")
    assert cpu_crossover.pinned_max_tokens(256) is None


KERNELS = [
    pytest.param(cpu_lut, id="cpu_lut"),
    pytest.param(cpu_lut_avx512, id="cpu_lut_avx512", marks=needs_avx512),
]


@pytest.mark.parametrize("kernel", KERNELS)
def test_measured_on_this_cpu(monkeypatch, kernel):
    monkeypatch.delenv(cpu_crossover.ENV_MAX_TOKENS, raising=False)
    monkeypatch.setenv(kernels.ENV_SWITCH, kernel.NAME)
    monkeypatch.setattr(cpu_crossover, "_measured", {})
    layer = random_vq(in_f=600, out_f=300, d=4, m=1)
    limit = kernel.lut_max_batch(layer)  # measures this kernel on this CPU
    costs = cpu_crossover._measured[kernel.NAME]
    assert list(cpu_crossover._measured) == [kernel.NAME]  # one model per kernel: their tables cost differently
    assert cpu_crossover.host_costs(kernel.NAME, None, None) is costs  # once per process
    assert all(math.isfinite(v) and v >= 0 for v in vars(costs).values())
    assert costs.lookup_ns + costs.table_ns > 0 and costs.dequant_ns > 0
    assert limit == costs.lut_max_tokens(600, 300, 4, 1, cap=kernel.LUT_MAX_TOKENS)
    with torch.no_grad():  # either side of the limit the kernel matches the reference
        for tokens in (limit, limit + 1):
            x = torch.randn(tokens, 600)
            decision = kernels.explain(layer, x)
            assert decision.path == kernel.NAME
            side = "table lookups" if tokens <= limit else "dequant + BLAS"
            if tokens > 1:  # explain names the path inside the kernel, and where its limit came from
                assert f"{kernel.NAME}: {side} ({tokens} tokens" in decision.reason
                assert f"lookup limit {limit} measured on this CPU)" in decision.reason
            y, ref = layer(x), layer._reference_linear(x)
            assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()
