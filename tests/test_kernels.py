"""vqlib.kernels: dispatch between registered kernels and the reference path is visible and switchable."""

import logging

import pytest
import torch

from vqlib import kernels
from vqlib.compress import VQLinear


@pytest.fixture
def isolated_registry(monkeypatch):
    """An empty registry for the test (the built-in kernels come back afterwards)."""
    monkeypatch.setattr(kernels, "_KERNELS", [])
    monkeypatch.setattr(kernels, "_BROKEN", {})
    monkeypatch.setattr(kernels, "_LOGGED", set())
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)


def _layer():
    torch.manual_seed(0)
    layer = VQLinear(8, 3, vector_dim=2, codebook_bits=2, bias=True)
    layer.codebooks.normal_()
    layer.codes.random_(0, 4)
    return layer


def _fake(name, value, supports=lambda layer, x: None, priority=0, calls=None):
    def run(layer, x):
        if calls is not None:
            calls.append(name)
        return torch.full((*x.shape[:-1], layer.out_features), value)

    return kernels.Kernel(name, "VQLinear", "cpu", run, supports, priority)


def test_without_kernels_the_reference_runs_and_says_why(isolated_registry):
    layer, x = _layer(), torch.randn(2, 8)
    decision = kernels.explain(layer, x)
    assert decision.path == "reference" and "no VQLinear kernel is registered" in decision.reason
    ref = torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)
    assert torch.allclose(layer(x), ref, atol=1e-6)


def test_highest_priority_supporting_kernel_runs(isolated_registry):
    calls = []
    kernels.register_kernel(_fake("slow", 1.0, priority=0, calls=calls))
    kernels.register_kernel(_fake("fast", 2.0, priority=5, calls=calls, supports=lambda l, x: "d=2 not covered"))
    layer, x = _layer(), torch.randn(2, 8)
    decision = kernels.explain(layer, x)
    assert decision.path == "slow"
    assert torch.equal(layer(x), torch.full((2, 3), 1.0)) and calls == ["slow"]


def test_unsupported_format_falls_back_loudly_once(isolated_registry, caplog):
    kernels.register_kernel(_fake("k", 1.0, supports=lambda l, x: "codebook_bits=2 not covered"))
    layer, x = _layer(), torch.randn(2, 8)
    with caplog.at_level(logging.INFO, logger="vqlib.kernels"):
        with pytest.warns(RuntimeWarning, match="reference path.*k: codebook_bits=2 not covered"):
            out = layer(x)
        layer(x)  # second call: no new log line
    assert len([r for r in caplog.records if "reference" in r.getMessage()]) == 1
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias), atol=1e-6)


def test_env_switch_forces_reference_or_restricts_names(isolated_registry, monkeypatch):
    kernels.register_kernel(_fake("a", 1.0, priority=1))
    kernels.register_kernel(_fake("b", 2.0))
    layer, x = _layer(), torch.randn(1, 8)
    monkeypatch.setenv(kernels.ENV_SWITCH, "reference")
    assert kernels.explain(layer, x).path == "reference"
    monkeypatch.setenv(kernels.ENV_SWITCH, "b")
    decision = kernels.explain(layer, x)
    assert decision.path == "b"
    monkeypatch.setenv(kernels.ENV_SWITCH, "auto")
    assert kernels.explain(layer, x).path == "a"


def test_build_failure_disables_kernel_with_one_warning(isolated_registry):
    def broken(layer, x):
        raise kernels.KernelBuildError("no compiler")

    kernels.register_kernel(kernels.Kernel("broken", "VQLinear", "cpu", broken, lambda l, x: None, priority=9))
    kernels.register_kernel(_fake("backup", 3.0))
    layer, x = _layer(), torch.randn(2, 8)
    with pytest.warns(RuntimeWarning, match="'broken' failed to build"):
        assert torch.equal(layer(x), torch.full((2, 3), 3.0))
    decision = kernels.explain(layer, x)
    assert decision.path == "backup"
    kernels.unregister_kernel("backup")
    assert "broken: failed to build (no compiler)" in kernels.explain(layer, x).reason


def test_register_rejects_non_kernel(isolated_registry):
    with pytest.raises(TypeError, match="expected a vqlib.kernels.Kernel"):
        kernels.register_kernel(lambda x, layer: x)


def test_deliberate_reference_choices_do_not_warn(isolated_registry, recwarn):
    kernels.register_kernel(_fake("k", 1.0))
    layer, x = _layer(), torch.randn(2, 8)
    layer.cache_dequantized_weight(torch.float32)
    decision = kernels.explain(layer, x)
    assert decision.path == "reference" and "weight cache" in decision.reason and not decision.fallback
    layer.cache_dequantized_weight(None)
    x.requires_grad_(True)
    decision = kernels.explain(layer, x)
    assert decision.path == "reference" and "gradients" in decision.reason
    out = layer(x)
    out.sum().backward()  # the reference path is differentiable
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert kernels.explain(layer, x).path == "k"
    assert not [w for w in recwarn if "reference path" in str(w.message)]
