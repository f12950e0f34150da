"""vqlib.kernels.cpu_lut_avx512: integer tables read by vpermi2b equal the reference path.

Tolerance, fp32 inputs, relative to the output's max |value|: 1e-3. Each table entry is rounded to an
integer in [-8190, 8190] with one scale per token and block of 16 code positions (an error of at most
6.1e-5 of the block's largest entry); a row's sum adds up a few hundred such errors (measured worst over
these formats and batches: 2.8e-4). bf16 inputs: 2e-2 against the fp32 reference of the same input, as
for cpu_lut.
"""

import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed (a core dependency of vqlib)")

from test_kernels_cpu import BF16_TOL, assert_numba_cache_written_then_reused, random_vq, rel_err  # noqa: E402
from vqlib.kernels import cpu_crossover, cpu_lut, cpu_lut_avx512  # noqa: E402

from vqlib import kernels  # noqa: E402

TOL = 1e-3
NAME = cpu_lut_avx512.NAME
needs_avx512 = pytest.mark.skipif(
    cpu_lut_avx512.isa_missing() is not None, reason=f"{NAME} cannot run here: {cpu_lut_avx512.isa_missing()}"
)
BATCHES = (1, 3, 8, 9, 17)  # all on the lookup path (test_prefill_... covers the dequant + BLAS one)
FORMATS = list(itertools.product((2, 4, 8), (1, 2), ("fp16", "int8"), (None, 128), ("row", "group", "none")))
FORMATS += [(8, 3, "int8", 128, "row"), (3, 1, "fp16", None, "row")]


@pytest.fixture(autouse=True)
def _auto_dispatch(monkeypatch):
    monkeypatch.delenv(kernels.ENV_SWITCH, raising=False)
    # The measured lookup limit of these tiny layers depends on the CPU (cpu_crossover): pin it so every batch
    # here takes the lookup path; test_prefill_... moves it.
    monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, str(cpu_lut_avx512.LUT_MAX_TOKENS))


@needs_avx512
@pytest.mark.parametrize("d,m,cb,gs,scales", FORMATS)
def test_matches_reference_fp32(d, m, cb, gs, scales):
    # out 301: two full row tiles of 128 and a partial one; in 300 -> a partial last block of positions
    layer = random_vq(in_f=300, out_f=301, d=d, m=m, cb=cb, gs=gs, scales=scales, bias=(d + m) % 2 == 0)
    for b in BATCHES:
        x = torch.randn(b, layer.in_features)
        assert kernels.explain(layer, x).path == NAME
        with torch.no_grad():
            y, ref = layer(x), layer._reference_linear(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert rel_err(y, ref) < TOL, (b, rel_err(y, ref))


@needs_avx512
@pytest.mark.parametrize("pinned", ["12", None])
def test_prefill_above_the_lookup_limit_uses_dequant_blas(monkeypatch, pinned):
    monkeypatch.delenv(cpu_crossover.ENV_MAX_TOKENS)
    if pinned is not None:
        monkeypatch.setenv(cpu_crossover.ENV_MAX_TOKENS, pinned)
    layer = random_vq(in_f=300, out_f=301, d=4, m=2, scales="group")
    limit = cpu_lut_avx512.lut_max_batch(layer)  # pinned, or measured on this CPU
    assert limit == 12 if pinned else 1 <= limit <= cpu_lut_avx512.LUT_MAX_TOKENS
    with torch.no_grad():
        x = torch.randn(limit + 1, 300)
        assert rel_err(layer(x), layer._reference_linear(x)) < 2e-5  # fp32 dequant + BLAS: no table rounding
        x = x[:limit]
        err = rel_err(layer(x), layer._reference_linear(x))
    assert 2e-5 < err < TOL  # the rounded tables: measurably not the exact path


@needs_avx512
@pytest.mark.parametrize("bits", [2, 4, 7])
def test_fewer_codebook_bits(bits):
    layer = random_vq(bits=bits, d=4, m=2, scales="group")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert rel_err(layer(x), layer._reference_linear(x)) < TOL


@needs_avx512
def test_bf16_input_keeps_dtype_and_leading_dims():
    layer = random_vq(d=4, m=1, scales="row")
    x = torch.randn(2, 5, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        y, ref32 = layer(x), layer._reference_linear(x.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, layer.out_features)
    assert rel_err(y, ref32) < BF16_TOL


@needs_avx512
def test_zero_input_and_outlier_input():
    layer = random_vq(in_f=512, out_f=130, d=4, m=1, scales="row", bias=False)
    with torch.no_grad():
        assert torch.equal(layer(torch.zeros(1, 512)), torch.zeros(1, 130))  # all-zero tables: scale 0, no NaN
        x = torch.randn(1, 512)
        x[0, 7] = 300.0  # one outlier channel (LLM activations have them): only its own block's scale grows
        assert rel_err(layer(x), layer._reference_linear(x)) < TOL


@needs_avx512
def test_non_finite_input_gives_non_finite_outputs():
    layer = random_vq(in_f=300, out_f=130, d=4, m=1, scales="row", bias=False)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 300)
        x[1, 123] = bad  # token 1 only: token 0 must stay exact
        with torch.no_grad():
            y, ref = layer(x), layer._reference_linear(x)
        assert torch.equal(torch.isfinite(y), torch.isfinite(ref)), bad
        assert rel_err(y[0], ref[0]) < TOL


@needs_avx512
def test_two_threads_equal_one_thread(monkeypatch):
    layer = random_vq(in_f=600, out_f=260, d=4, m=2, scales="group")
    monkeypatch.setattr(cpu_lut, "SERIAL_MAX_CODES", 0)  # split even this small layer
    x = torch.randn(3, 600)
    with torch.no_grad():
        one = layer(x)
        torch.set_num_threads(2)  # conftest restores the thread count
        two = layer(x)
    assert torch.equal(one, two)  # chunks are summed in a fixed order
    assert rel_err(two, layer._reference_linear(x)) < TOL
    big = torch.randn(100, 600)  # accumulators over ACC_BYTES: the fewest chunks, still not thread-dependent
    monkeypatch.setattr(cpu_lut, "ACC_BYTES", 4 * 100 * 384)
    with torch.no_grad():
        torch.set_num_threads(1)
        one = layer(big)
        torch.set_num_threads(2)
        assert torch.equal(one, layer(big))


@needs_avx512
def test_tiles_follow_buffer_changes_and_are_never_saved():
    layer, x = random_vq(in_f=300, out_f=40), torch.randn(1, 300)
    with torch.no_grad():
        before = layer(x)
        layer.codes.random_(0, 256)  # in place: bumps the version, the tiles must be rebuilt
        after = layer(x)
    assert not torch.allclose(before, after)
    assert rel_err(after, layer._reference_linear(x)) < TOL
    assert not any("cpu_lut" in k for k in layer.state_dict())


@needs_avx512
def test_tile_layout_is_position_major():
    layer = random_vq(in_f=80, out_f=130, d=4, m=1)  # 20 positions (2 blocks), 130 rows (2 row tiles)
    p = cpu_lut.prepare(layer)
    m = cpu_lut_avx512.load_numba()
    t = cpu_lut_avx512.tiles(p, m)
    codes = layer.codes.reshape(130, 20).numpy()
    assert t.shape == (2, 2, 16 * 128)
    rows = t.reshape(2, 2, 16, 2, 64)[..., np.argsort(m.ROW_OF_BYTE)].reshape(2, 2, 16, 128)  # byte -> row order
    assert np.array_equal(rows[0, 0, :, 5], codes[5, :16])
    assert np.array_equal(rows[1, 1, :4, 1], codes[129, 16:])
    assert not rows[1, 1, 4:].any() and not rows[1, 1, :, 2:].any()  # zero padding


@needs_avx512
def test_env_switch_selects_the_fp32_table_loop(monkeypatch):
    layer, x = random_vq(), torch.randn(1, 251)
    monkeypatch.setenv(kernels.ENV_SWITCH, "cpu_lut")
    decision = kernels.explain(layer, x)
    assert decision.path == "cpu_lut" and f"{NAME}: not listed" in decision.reason


def test_missing_instruction_set_declines_and_warns_once(monkeypatch):
    monkeypatch.setattr(cpu_lut_avx512, "_isa_reason", "this CPU (test) lacks avx512vbmi (vpermi2b)")
    monkeypatch.setattr(cpu_lut_avx512, "_warned", False)
    layer, x = random_vq(), torch.randn(1, 251)
    with pytest.warns(RuntimeWarning, match="cpu_lut_avx512 cannot run: this CPU .* lacks avx512vbmi"):
        decision = kernels.explain(layer, x)
    assert decision.path == "cpu_lut" and "lacks avx512vbmi" in decision.reason
    with torch.no_grad():
        y = cpu_lut.run(layer, x)
    assert rel_err(y, layer._reference_linear(x)) < 2e-5


def test_isa_check_follows_numba_target_settings(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma")
    assert "lacks avx512f, avx512bw, avx512vbmi" in cpu_lut_avx512._check_isa()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw")  # Skylake-X: no byte permutes
    assert "lacks avx512vbmi" in cpu_lut_avx512._check_isa()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw,+avx512vbmi")
    assert cpu_lut_avx512._check_isa() == ""
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    assert "features are unknown" in cpu_lut_avx512._check_isa()


# Runs the job once on a tiny problem (1 token, 2 positions of d = 2, one tile) in the loop module ``m`` (loaded by
# test_kernels_cpu's stand-in package, without torch) and prints numba's cache hits and misses for it.
LUT16_JOB_ONCE = """
    x, tiles = np.ones((1, 4), np.float32), np.zeros(m.TILE_BYTES, np.uint8)
    cbt, qcb = np.ones(2 * 256, np.float32), np.zeros(2, np.int32)
    scales_t, acc = np.ones((1, m.TILE_ROWS), np.float32), np.zeros((1, 1, m.TILE_ROWS), np.float32)
    a = np.zeros(m.LUT16_ARGS + 1, np.int64)
    for field, arr in [(m.T_X, x), (m.T_TILES, tiles), (m.T_CBT, cbt), (m.T_QCB, qcb), (m.T_SCALES_T, scales_t),
                       (m.T_ACC, acc)]:
        a[field] = arr.ctypes.data
    for field, value in [(m.T_B, 1), (m.T_IN_PAD, 4), (m.T_N_BLK, 1), (m.T_N_RT, 1), (m.T_NQ, 2), (m.T_CBT_N, 512),
                         (m.T_M, 1), (m.T_D, 2), (m.T_SGQ, 2), (m.T_N_CHUNKS, 1)]:
        a[field] = value
    m.lut16_job(a)
    assert abs(acc[0, 0, 0] - 4.0) < 1e-3, acc[0, 0, :4]  # two positions, each 1*1 + 1*1
    print(sum(m.lut16_job.stats.cache_hits.values()), sum(m.lut16_job.stats.cache_misses.values()))
    """


@needs_avx512
def test_numba_cache_is_written_then_reused(tmp_path):
    assert_numba_cache_written_then_reused(tmp_path, "cpu_vq_avx512_numba", LUT16_JOB_ONCE, "lut16_job")
