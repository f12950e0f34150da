"""vqlib.kernels.cpu_lut / cpu_scalar: the numba CPU kernels equal the reference path.

These tests pin the fp32-table loop (``VQLINEAR_KERNELS=cpu_lut,cpu_scalar``); its int16-table AVX-512
variant has its own file, tests/test_kernels_cpu_avx512.py.

Tolerances: fp32 inputs, relative to the output's max |value|: 2e-5 (table lookups and the reference
sum the same products in a different order, fp32 accumulation). bf16 inputs: the kernel accumulates
in fp32 and rounds the output once, the reference runs F.linear in bf16 with a bf16-rounded weight;
both are compared to the fp32 reference of the same (bf16-valued) input at 2e-2.
"""

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed (a core dependency of vqlib)")

from vqlib.kernels import cpu_crossover, cpu_lut, cpu_lut_avx512, cpu_scalar  # noqa: E402

from vqlib import kernels  # noqa: E402
from vqlib.compress import VQLinear  # noqa: E402
from vqlib.compress.scalar import ScalarLinear  # noqa: E402

FP32_TOL = 2e-5
BF16_TOL = 2e-2
PINNED_LUT_TOKENS = 16  # the lookup limit these tests pin (measured per CPU otherwise: cpu_crossover)
BATCHES = (1, 3, 8, 9, PINNED_LUT_TOKENS + 1)  # the last one takes the dequant + BLAS path


def random_vq(in_f=251, out_f=17, *, d=4, m=1, gs=128, cb="int8", scales="row", bias=True, bits=8, seed=0):
    torch.manual_seed(seed)
    layer = VQLinear(
        in_f,
        out_f,
        vector_dim=d,
        num_codebooks=m,
        codebook_bits=bits,
        group_size=gs,
        codebook_dtype=cb,
        scale_granularity=scales,
        bias=bias,
    )
    if cb == "int8":
        layer.codebooks.random_(-127, 128)
        layer.codebook_scales.uniform_(0.002, 0.02)
    else:
        layer.codebooks.normal_()
    layer.codes.random_(0, min(2**bits, 2**15))  # int16 storage holds the uint16 pattern
    if layer.scales is not None:
        layer.scales.uniform_(0.5, 1.5)
    if bias:
        layer.bias.data.normal_()
    return layer


def rel_err(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


@pytest.fixture(autouse=True)
def _fp32_table_kernels(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "cpu_lut,cpu_scalar")
    monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, str(PINNED_LUT_TOKENS))


FORMATS = list(itertools.product((2, 4, 8), (1, 2), ("fp16", "int8"), (None, 128), ("row", "group", "none")))
FORMATS += [(8, 3, "int8", 128, "row"), (3, 1, "fp16", None, "row")]  # ~3 bits (the benchmark's), an odd d


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_lut_kernel_fewer_codebook_bits(bits):
    layer = random_vq(bits=bits, d=4, m=2, scales="group")
    for b in (1, 9, PINNED_LUT_TOKENS + 1):
        x = torch.randn(b, layer.in_features)
        assert kernels.explain(layer, x).path == "cpu_lut"
        with torch.no_grad():
            assert rel_err(layer(x), layer._reference_linear(x)) < FP32_TOL


@pytest.mark.parametrize("d,m,cb,gs,scales", FORMATS)
def test_lut_kernel_matches_reference_fp32(d, m, cb, gs, scales):
    layer = random_vq(d=d, m=m, cb=cb, gs=gs, scales=scales, bias=(d + m) % 2 == 0)  # half with bias
    for b in BATCHES:
        x = torch.randn(b, layer.in_features)
        assert kernels.explain(layer, x).path == "cpu_lut"
        with torch.no_grad():
            y, ref = layer(x), layer._reference_linear(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert rel_err(y, ref) < FP32_TOL, (b, rel_err(y, ref))


def test_explain_names_the_path_inside_the_kernel():
    layer = random_vq()
    reasons = [kernels.explain(layer, torch.randn(b, layer.in_features)).reason for b in (1, 8, PINNED_LUT_TOKENS + 1)]
    assert reasons[0].endswith("cpu_lut: table lookups (1 token: decoding always looks up)")
    assert reasons[1].endswith(
        "cpu_lut: table lookups (8 tokens, at most the lookup limit 16 pinned by VQLIB_CPU_LUT_MAX_TOKENS)"
    )
    assert reasons[2].endswith(
        "cpu_lut: dequant + BLAS (17 tokens, above the lookup limit 16 pinned by VQLIB_CPU_LUT_MAX_TOKENS)"
    )


@pytest.mark.parametrize("d,m,scales", [(4, 1, "row"), (8, 2, "group"), (2, 2, "none")])
def test_lut_kernel_bf16_input(d, m, scales):
    layer = random_vq(d=d, m=m, scales=scales)
    for b in (1, 9, PINNED_LUT_TOKENS + 1):
        x = torch.randn(2, b, layer.in_features).to(torch.bfloat16)  # 3-D input, leading dims kept
        with torch.no_grad():
            y, ref32 = layer(x), layer._reference_linear(x.float())
        assert y.dtype == torch.bfloat16 and y.shape == (2, b, layer.out_features)
        assert rel_err(y, ref32) < BF16_TOL


def test_two_threads_equal_one_thread(monkeypatch):
    layer = random_vq(in_f=300, out_f=101, d=4, m=2, scales="group")
    monkeypatch.setattr(cpu_lut, "SERIAL_MAX_CODES", 0)  # split even this small layer
    x = torch.randn(3, 300)
    with torch.no_grad():
        one = layer(x)
        torch.set_num_threads(2)  # conftest restores the thread count
        two = layer(x)
        blas_two = layer(torch.randn(PINNED_LUT_TOKENS + 5, 300))
    assert torch.equal(one, two)  # each row is computed by the same code on either thread
    assert rel_err(two, layer._reference_linear(x)) < FP32_TOL
    assert blas_two.shape == (PINNED_LUT_TOKENS + 5, 101)


def test_prepared_arrays_follow_buffer_changes():
    layer, x = random_vq(), torch.randn(1, 251)
    with torch.no_grad():
        before = layer(x)
        layer.codes.random_(0, 256)  # in-place: bumps the version, the cache must be rebuilt
        after = layer(x)
    assert not torch.allclose(before, after)
    assert rel_err(after, layer._reference_linear(x)) < FP32_TOL
    assert not any("cpu_lut" in k for k in layer.state_dict())  # the cache is never saved


def test_unsupported_format_uses_reference_with_reason():
    layer, x = random_vq(bits=16, d=2), torch.randn(2, 251)  # B=16: int16 codes
    decision = kernels.explain(layer, x)
    assert decision.path == "reference" and "codebook_bits=16 not covered" in decision.reason
    kernels.reset_dispatch_log()
    with pytest.warns(RuntimeWarning, match="falling back to the slow reference path"):
        layer(x)


def test_env_switch_forces_reference(monkeypatch):
    layer, x = random_vq(), torch.randn(1, 251)
    monkeypatch.setenv(kernels.ENV_SWITCH, "reference")
    assert kernels.explain(layer, x).path == "reference"
    with torch.no_grad():
        assert torch.equal(layer(x), layer._reference_linear(x))
    monkeypatch.setenv(kernels.ENV_SWITCH, "cpu_lut")
    assert kernels.explain(layer, x).path == "cpu_lut"


def test_missing_numba_disables_the_kernel_loudly(monkeypatch):
    monkeypatch.setattr(cpu_lut, "_numba_mod", None)
    monkeypatch.setitem(sys.modules, "vqlib.kernels.cpu_vq_numba", None)  # import fails like a missing numba
    monkeypatch.delattr(kernels, "cpu_vq_numba", raising=False)
    monkeypatch.setattr(kernels, "_BROKEN", {})
    layer, x = random_vq(), torch.randn(1, 251)
    with pytest.warns(RuntimeWarning, match="'cpu_lut' failed to build"):
        with torch.no_grad():
            y = layer(x)
    assert torch.equal(y, layer._reference_linear(x))
    assert "cpu_lut: failed to build" in kernels.explain(layer, x).reason


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scalar_kernel_matches_reference(bits):
    torch.manual_seed(bits)
    layer = ScalarLinear.from_linear(torch.nn.Linear(203, 33), bits=bits, group_size=64)
    for b in (1, 3, cpu_scalar.GEMV_MAX_BATCH + 1):
        x = torch.randn(b, 203)
        assert kernels.explain(layer, x).path == "cpu_scalar"
        with torch.no_grad():
            assert rel_err(layer(x), layer._reference_linear(x)) < FP32_TOL


# Loads kernels/<module>.py by path as ``m``, inside a stand-in package for its relative imports (numpy + numba
# only: no torch import); the caller's body then compiles one function and prints its cache hits and misses.
LOOP_MODULE_LOADER = """
import importlib.util, os, sys, types
import numpy as np
package = sys.modules["loops"] = types.ModuleType("loops")
package.__path__ = [os.path.dirname(sys.argv[1])]
spec = importlib.util.spec_from_file_location("loops.{module}", sys.argv[1])
m = sys.modules["loops.{module}"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
"""


def assert_numba_cache_written_then_reused(tmp_path, module: str, body: str, function: str) -> None:
    """Run the loader + ``body`` twice with NUMBA_CACHE_DIR=tmp_path: compiled first, loaded from the cache second."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    script = LOOP_MODULE_LOADER.format(module=module) + textwrap.dedent(body)
    source = os.path.join(os.path.dirname(kernels.__file__), f"{module}.py")

    def run():
        return subprocess.run(
            [sys.executable, "-c", script, source], env=env, capture_output=True, text=True, timeout=240
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["0", "1"]  # compiled
    index_files = list(tmp_path.rglob(f"*{function}*.nbi"))
    assert index_files, "numba wrote no cache index under NUMBA_CACHE_DIR"
    second = run()
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["1", "0"]  # loaded from the cache, not compiled


FILL_TABLE_ONCE = """
    table = np.empty(16 * 256, np.float32)
    m.fill_table(np.ones(8, np.float32), np.ones(4 * 256, np.float32), np.zeros(2, np.int32), 0, 2, 1, 4, table)
    print(sum(m.fill_table.stats.cache_hits.values()), sum(m.fill_table.stats.cache_misses.values()))
    """


def test_numba_cache_is_written_then_reused(tmp_path):
    assert_numba_cache_written_then_reused(tmp_path, "cpu_vq_numba", FILL_TABLE_ONCE, "fill_table")


@pytest.mark.parametrize("kernel", ["cpu_lut", "cpu_lut_avx512"])
def test_generate_with_kernel_matches_reference(monkeypatch, kernel):
    if kernel == "cpu_lut_avx512" and cpu_lut_avx512.isa_missing():
        pytest.skip(f"cpu_lut_avx512 cannot run here: {cpu_lut_avx512.isa_missing()}")
    monkeypatch.setenv(kernels.ENV_SWITCH, kernel)
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'bench' extra)")
    from vqlib.compress import VQConfig, compress

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model, report = compress(model, VQConfig(algorithm="data_free", group_size=64, kmeans_iters=2, finetune_steps=0))
    assert report.compressed
    layer = next(mod for mod in model.modules() if isinstance(mod, VQLinear))
    ids = torch.randint(1, 96, (1, 6))
    assert kernels.explain(layer, torch.zeros(1, layer.in_features)).path == kernel
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits, tokens = model(ids).logits, model.generate(ids, **greedy)
        monkeypatch.setenv(kernels.ENV_SWITCH, "reference")
        ref_logits, ref_tokens = model(ids).logits, model.generate(ids, **greedy)
    # cpu_lut_avx512 rounds its tables to 14-bit integers (tests/test_kernels_cpu_avx512.py): measured 2e-4
    assert rel_err(logits, ref_logits) < (1e-4 if kernel == "cpu_lut" else 1e-3)
    assert torch.equal(tokens, ref_tokens)
