"""The Triton path of a call is the fastest measured one (vqlib.kernels.triton_crossover).

Without a GPU the registry's Triton entries run CPU tensors in the interpreter, where times mean nothing:
the ranking logic is tested with a fake clock, and the timing machinery once for real on a tiny layer.
"""

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_triton import assert_matches, make_layer, no_log_while_compiling  # noqa: E402,F401
from vqlib.kernels import triton_crossover as tc  # noqa: E402
from vqlib.kernels import triton_vq as tv  # noqa: E402
from vqlib.kernels import triton_vq_ops as ops  # noqa: E402

from vqlib import kernels  # noqa: E402


@pytest.fixture
def measured(monkeypatch, cpu_registry):
    """Rankings measured on CPU tensors with a fake clock; returns the list of timed (path, tokens)."""
    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.delenv(tc.ENV_TUNING, raising=False)
    timed = []

    def clock(path, probe, args, flush, tile=None):  # the GEMM beats the GEMV; decode-then-cuBLAS wins from 8 tokens
        n = probe.shape[0]
        if tile is None:  # the default plan (the other plans tie with it here, so the default is kept)
            timed.append((path, n))
        return {"gemv": 5.0 * n, "gemm": 3.0 * n, "dequant_matmul": 9.0 + n}[path]

    monkeypatch.setattr(tc, "_time_path", clock)
    monkeypatch.setattr(tc, "_default_output", lambda *args: None)  # no output check (its own test runs it)
    return timed


def x_of(layer, tokens):
    return torch.randn(tokens, layer.in_features)


def test_bucket_and_admissible_paths():
    assert [tc.bucket(n) for n in (1, 2, 3, 4, 5, 17, 300, 2048, 5000)] == [1, 2, 4, 4, 8, 32, 512, 2048, 2048]
    assert tc.admissible(tv.GEMV_MAX_BATCH) == ("gemv", "gemm", "dequant_matmul", "smem_gemv", "smem_mma")
    assert tc.admissible(tv.GEMV_MAX_BATCH + 1) == ("gemm", "dequant_matmul", "smem_gemv", "smem_mma")
    assert tc.admissible(9) == ("gemm", "dequant_matmul", "smem_mma")  # the shared-memory GEMV: 1-8 tokens
    assert tc.admissible(17) == ("gemm", "dequant_matmul")  # the shared-memory tensor-core kernel: 1-16


def test_kernel_names_and_paths_are_inverse():
    for layer_type in ("VQLinear", "FusedVQLinear"):
        for kernel in tv.kernel_entries("cpu", layer_type):
            path = tv.path_of(kernel.name)
            assert path in tc.PATHS + tuple(tv.CUDA_CPP_PATHS) and tv.kernel_name_for(path, layer_type) == kernel.name
    assert tv.path_of("reference") is None and tv.path_of("cpu_lut_avx512") is None


def test_fastest_measured_path_runs_and_says_why(measured):
    layer = make_layer("d8_2x8_row_pad")
    decision = kernels.explain(layer, x_of(layer, 1))
    assert decision.path == "triton_vq_gemm"  # 3 us beats the GEMV's 5 us
    assert "gemm measured faster at 1 tokens on this device (3.0 us vs 5.0 us)" in decision.reason
    assert decision.reason.endswith(
        "triton_vq_gemm: measured fastest usable at 1 tokens on this device "
        "(gemm 3.0 us, gemv 5.0 us, dequant_matmul 10.0 us)"
    )
    assert measured == [("gemv", 1), ("gemm", 1), ("dequant_matmul", 1)]
    # 9 tokens: timed at 16 (the bucket), where the fake decode-then-cuBLAS is fastest; no GEMV (above its limit)
    decision = kernels.explain(layer, x_of(layer, 9))
    assert decision.path == "triton_vq_dequant_matmul"
    assert "dequant_matmul measured faster at 16 tokens" in decision.reason
    assert measured[3:] == [("gemm", 16), ("dequant_matmul", 16)]


def test_measurement_is_shared_by_shape_format_and_bucket(measured):
    first, same_shape = make_layer("d8_2x8_row_pad", seed=1), make_layer("d8_2x8_row_pad", seed=2)
    kernels.explain(first, x_of(first, 3))
    kernels.explain(same_shape, x_of(same_shape, 4))  # same bucket, shape and format: no new timing
    assert len(measured) == 3
    other = make_layer("d4_2x8_g128_int8")
    kernels.explain(other, x_of(other, 3))  # another format is timed
    assert len(measured) == 6
    kernels.explain(first, x_of(first, 3).double())  # a dtype the kernels do not cover: nothing timed
    assert len(measured) == 6


def test_unusable_faster_path_is_skipped(measured, monkeypatch):
    layer = make_layer("d8_2x8_row_pad")
    monkeypatch.setenv(kernels.ENV_SWITCH, "triton_vq_gemv,triton_vq_gemm")
    assert kernels.explain(layer, x_of(layer, 64)).path == "triton_vq_gemm"
    assert ("dequant_matmul", 64) not in measured  # a kernel that may not run is not timed
    monkeypatch.delenv(kernels.ENV_SWITCH)
    assert kernels.explain(layer, x_of(layer, 40)).path == "triton_vq_dequant_matmul"  # bucket 64: measured again


def fail_when_timing(monkeypatch, failing_path: str, exc: Exception) -> None:
    """The (fake) clock raises ``exc`` for one path and times the others."""
    clock = tc._time_path

    def failing(path, *args):
        if path == failing_path:
            raise exc
        return clock(path, *args)

    monkeypatch.setattr(tc, "_time_path", failing)


def test_build_failure_while_timing_disables_that_kernel(measured, monkeypatch):
    layer = make_layer("d8_2x8_row_pad")
    fail_when_timing(monkeypatch, "gemm", kernels.KernelBuildError("vq_gemm_kernel: OutOfResources"))
    with pytest.warns(RuntimeWarning, match="'triton_vq_gemm' failed to build.*falling back"):
        decision = kernels.explain(layer, x_of(layer, 1))
    assert decision.path == "triton_vq_gemv"
    assert "triton_vq_gemm: failed to build" in kernels.explain(layer, x_of(layer, 8)).reason


def test_out_of_memory_while_timing_ranks_that_path_last(measured, monkeypatch):
    layer = make_layer("d8_2x8_row_pad")
    fail_when_timing(monkeypatch, "dequant_matmul", torch.OutOfMemoryError("CUDA out of memory (test)"))
    ranking = tc.ranking(layer, x_of(layer, 64), 64)
    assert ranking.paths == ("gemm", "dequant_matmul") and "dequant_matmul" not in ranking.times_us
    decision = kernels.explain(layer, x_of(layer, 64))  # the fake clock would prefer dequant + cuBLAS here
    assert decision.path == "triton_vq_gemm"
    assert decision.reason.endswith("(gemm 192.0 us, dequant_matmul not timed: out of memory)")


def test_default_rule_where_nothing_is_measured(measured, monkeypatch):
    layer = make_layer("d8_2x8_row_pad")
    monkeypatch.setenv(tc.ENV_TUNING, "off")
    decision = kernels.explain(layer, x_of(layer, 300))
    assert decision.path == "triton_vq_dequant_matmul" and measured == []
    assert (
        "DEQUANT_MATMUL_MIN_BATCH=256" in decision.reason and "not measured: VQLIB_TRITON_TUNING=off" in decision.reason
    )
    decision = kernels.explain(layer, x_of(layer, 1))
    assert decision.path == "triton_vq_gemv"
    assert decision.reason == "triton_vq_gemv: default rule (not measured: VQLIB_TRITON_TUNING=off)"
    monkeypatch.setenv(tc.ENV_TUNING, "fast")
    with pytest.raises(ValueError, match="VQLIB_TRITON_TUNING must be 'measure' or 'off', got 'fast'"):
        kernels.explain(layer, x_of(layer, 1))


def test_compiled_graph_records_the_eager_measurement(measured, no_log_while_compiling, monkeypatch):  # noqa: F811
    layer = make_layer("d8_2x8_row_pad")
    x = x_of(layer, 2)
    tc.tune(torch.nn.Sequential(layer), tokens=(2,), dtype=torch.float32)  # eager: gemm measured fastest
    ran = []
    fused_linear = ops.fused_linear
    monkeypatch.setattr(ops, "fused_linear", lambda *a, **k: ran.append(a[-1]) or fused_linear(*a, **k))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_matches(compiled(x), layer._reference_linear(x))
    assert ran == ["gemm"]  # not the default rule's GEMV


def test_tune_reports_every_layer_and_token_count(measured):
    model = torch.nn.Sequential(make_layer("d8_2x8_row_pad"), torch.nn.ReLU(), make_layer("d4_2x8_g128_int8"))
    chosen = tc.tune(model, tokens=(1, 32), dtype=torch.float32)
    assert chosen == {
        ("0", 1): "triton_vq_gemm",
        ("0", 32): "triton_vq_dequant_matmul",
        ("2", 1): "triton_vq_gemm",
        ("2", 32): "triton_vq_dequant_matmul",
    }


def test_real_timing_through_the_interpreter(cpu_registry, monkeypatch):
    """The clock itself: every path is run and timed, and the chosen one computes the layer."""
    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(tc, "REPS", 1)
    layer = make_layer("d1_1x4_groupscale")
    x = x_of(layer, 2)
    ranking = tc.ranking(layer, x, 2)
    assert set(ranking.paths) == {"gemv", "gemm", "dequant_matmul"} and ranking.bucket == 2
    assert all(0 < us < 60e6 for us in ranking.times_us.values())
    with torch.no_grad():
        assert_matches(layer(x), layer._reference_linear(x))


def test_fastest_tile_plan_runs_and_is_explained(measured, monkeypatch):
    """Each path is ranked by its fastest tile plan, and the call runs that plan."""
    clock = tc._time_path
    tried = []

    def prefetch_wins(path, probe, args, flush, tile=None):
        tried.append((path, tile))
        fast = tile is not None and ops.TilePlan.decode(tile).prefetch
        return clock(path, probe, args, flush, tile) - (4.5 if fast else 0.0)

    monkeypatch.setattr(tc, "_time_path", prefetch_wins)
    layer = make_layer("d8_2x8_row_pad")
    x = x_of(layer, 1)
    ranking = tc.ranking(layer, x, 1)
    gemv_tiles = [tile for path, tile in tried if path == "gemv"]
    assert gemv_tiles[0] is None and len(gemv_tiles) >= 3  # the default plan, then the other candidates
    assert [t for p, t in tried if p == "dequant_matmul"] == [None]  # one plan only
    chosen = ops.TilePlan.decode(ranking.tile("gemv"))
    assert chosen.prefetch and ranking.paths[0] == "gemv" and ranking.tile("gemm") is None
    decision = kernels.explain(layer, x)
    assert decision.path == "triton_vq_gemv" and "prefetch" in decision.reason, decision.reason
    ran = []
    fused_linear = ops.fused_linear
    monkeypatch.setattr(ops, "fused_linear", lambda *a, **k: ran.append(k.get("plan")) or fused_linear(*a, **k))
    with torch.no_grad():
        assert_matches(layer(x), layer._reference_linear(x))
    assert ran == [chosen]


def test_tile_plan_that_fails_to_build_is_skipped_loudly(measured, monkeypatch):
    clock = tc._time_path

    def prefetch_breaks(path, probe, args, flush, tile=None):
        if tile is not None and ops.TilePlan.decode(tile).prefetch:
            raise kernels.KernelBuildError("vq_gemv_kernel: OutOfResources (test)")
        return clock(path, probe, args, flush, tile)

    monkeypatch.setattr(tc, "_time_path", prefetch_breaks)
    monkeypatch.setattr(tc, "_WARNED_TILES", set())
    layer = make_layer("d8_2x8_row_pad")
    with pytest.warns(RuntimeWarning, match="gemv tile plan .*prefetch.* failed to build and is not timed"):
        ranking = tc.ranking(layer, x_of(layer, 1), 1)
    assert "gemv" in ranking.times_us and kernels.kernel_name_usable("triton_vq_gemv")  # the kernel stays usable


def test_tile_plan_with_a_wrong_output_is_never_chosen(cpu_registry, monkeypatch):
    """Each plan's output is compared with the default plan's before it is timed (the real op, interpreted)."""
    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "_WARNED_TILES", set())
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(tc, "_time_path", lambda path, probe, args, flush, tile=None: 1.0 if tile else 9.0)
    vq_linear = torch.ops.vqlib.vq_linear

    class Ops:  # the 64-row GEMV plan returns a corrupted output
        def vq_linear(self, x, *args):
            y = vq_linear(x, *args)
            tile = args[-1]
            return y + 1.0 if args[-2] == "gemv" and tile and ops.TilePlan.decode(tile).block_n == 64 else y

    monkeypatch.setattr(tc.torch, "ops", type("T", (), {"vqlib": Ops()})())
    layer = make_layer("d1_1x4_groupscale")
    with pytest.warns(RuntimeWarning, match=r"gemv tile plan \(tiles of 64 rows.*\) disagrees with the default plan"):
        ranking = tc.ranking(layer, x_of(layer, 1), 1)
    chosen = ops.TilePlan.decode(ranking.tile("gemv"))  # a plan that agreed, at 1 us; never the 64-row one
    assert chosen.block_n == 32 and ranking.times_us["gemv"] == 1.0


# ---- native GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_measured_choice_is_explained_and_correct(monkeypatch):
    monkeypatch.setattr(tc, "_RANKINGS", {})
    layer = make_layer("d8_2x8_row_pad", device="cuda")
    for tokens in (1, 16, 1024):
        x = torch.randn(tokens, layer.in_features, device="cuda", dtype=torch.float16)
        ranking = tc.ranking(layer, x, tokens)
        assert ranking.times_us is not None and set(ranking.paths) == set(tc.admissible(tokens))
        decision = kernels.explain(layer, x)
        assert decision.path == tv.kernel_name(ranking.paths[0], layer)
        if tokens > 1 or ranking.paths[0] != "gemv":
            assert "measured faster" in decision.reason
        with torch.no_grad():
            assert_matches(layer(x), layer._reference_linear(x), torch.float16)
