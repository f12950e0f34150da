"""benchmarks/bench_kernels_gpu.py off the GPU: its plan, its summary of measured rows (crossover, the issue's
targets, JSON, plot) and its refusal without CUDA. The GPU measurement itself runs once per lent device call
(benchmarks/gpu_check.sh); a mistake in the summary would waste that call, so it is checked here on made-up rows."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _row(shape, batch, t_dense, t_fused, t_deq, fmt="d8_2x8", dtype="fp16", vq_bytes=16_800_000):
    """One row as measure_group writes it, with the dispatch taking the faster of fused and dequant."""
    t_auto = min(t_fused, t_deq)
    return dict(
        shape=shape,
        fmt=fmt,
        dtype=dtype,
        batch=batch,
        vq_bytes=vq_bytes,
        t_dense_us=t_dense,
        t_fused_us=t_fused,
        t_dequant_us=t_deq,
        auto="gemv" if t_fused <= t_deq else "dequant_matmul",
        t_auto_us=t_auto,
        auto_vs_best=1.0,
        speedup_auto=t_dense / t_auto,
        speedup_fused=t_dense / t_fused,
        gbps_fused=vq_bytes / (t_fused * 1e-6) / 1e9,
    )


def _rows():
    # 8192x8192 at ~2 bits: batch 1 at 5x dense and 16.8 MB in 7 us (2.4 TB/s); batch 16 at 1.5x (a miss);
    # decode-then-cuBLAS ahead from batch 256 on; batch 1024 at 1.05x dense time (met).
    return [
        _row("8192x8192", 1, 35.0, 7.0, 40.0),
        _row("8192x8192", 16, 36.0, 24.0, 41.0),
        _row("8192x8192", 64, 60.0, 50.0, 70.0),
        _row("8192x8192", 256, 150.0, 200.0, 160.0),
        _row("8192x8192", 1024, 500.0, 800.0, 525.0),
    ]


def test_targets_are_judged_from_the_auto_path(bench):
    checks = {t["target"]: t for t in bench.targets(_rows(), copy_gbps=4.0e12)}
    assert checks["batch 1 speed-up >= 4x"] == dict(checks["batch 1 speed-up >= 4x"], value=5.0, met=True)
    assert checks["batch 1 >= 60% copy bandwidth"]["value"] == pytest.approx(0.6, abs=1e-3)  # 2.4 of 4.0 TB/s
    assert checks["batch 16 speed-up >= 2x"]["met"] is False
    assert checks["batch 1024 time <= 1.1x dense"] == dict(
        checks["batch 1024 time <= 1.1x dense"], value=1.05, met=True
    )


def test_crossover_is_the_batch_from_which_dequant_always_wins(bench):
    rows = _rows()
    assert bench.crossovers(rows) == {"8192x8192/d8_2x8/fp16": 256}
    rows[-1] = _row("8192x8192", 1024, 500.0, 450.0, 525.0)  # fused wins again at the largest batch
    assert bench.crossovers(rows) == {"8192x8192/d8_2x8/fp16": None}


def test_json_and_plot_are_written(bench, tmp_path):
    args = bench.parse_args(["--out", str(tmp_path / "run")])
    rows = _rows() + [_row("4096x4096", b, 12.0 * b, 3.0 * b, 10.0 * b, fmt="d4_1x8", dtype="bf16") for b in (1, 4)]
    result = bench.write_json(args, {"gpu": "made-up"}, 4000.0, 0.0, rows, not_run=["x/y/z"])
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["rows"][0]["copy_fraction_fused"] == pytest.approx(0.6, abs=1e-3)
    assert written["measured_crossover"] == result["measured_crossover"]
    assert written["not_run"] == ["x/y/z"] and len(written["targets"]) == 4
    assert bench.plot(rows, tmp_path / "run.png") is None
    from PIL import Image

    with Image.open(tmp_path / "run.png") as img:
        assert img.size[0] >= 360 and img.size[1] >= 260


def test_plan_covers_the_issue_grid(bench, capsys):
    args = bench.parse_args([])
    configs = bench.plan(args)
    assert len(configs) == 5 * 6 * 3 * 2  # shapes x batches x formats x dtypes
    bench.print_plan(configs, 50 * 2**20)
    out = capsys.readouterr().out
    assert "8192x8192  d4_1x8: 2.00" in out  # about 2 bits per weight
    assert bench.copies_for(16_800_000, 50 * 2**20) == 7  # one pass over the copies is >= 2x the L2


def test_shape_typo_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "4096by4096"])
    assert "expected IN x OUT like 4096x14336, got '4096by4096'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so(bench, capsys):
    assert bench.main(["--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_measure_group_runs_every_method(bench, monkeypatch, cpu_registry):
    """The measurement's calls (custom op, dispatch, row fields) on CPU tensors through the Triton interpreter,
    with a timer that runs each call once (no CUDA graphs here)."""
    pytest.importorskip("triton")
    from vqlib.kernels import triton_vq_ops  # noqa: F401  (defines torch.ops.vqlib.*; on a GPU triton_vq imports it)

    outputs = []

    def run_once(calls, reps):
        outputs.extend(call() for call in calls)
        return 1e-3

    monkeypatch.setattr(bench, "time_graph", run_once)
    monkeypatch.setitem(bench.DTYPES, "fp32", torch.float32)  # the interpreter has no fp16 arithmetic
    rows = bench.measure_group("40x24", "d4_1x8", "fp32", [1, 5, 300], l2=1, reps=1, device="cpu")
    assert [(r["batch"], r["fused_path"], r["auto"]) for r in rows] == [
        (1, "gemv", "gemv"),
        (5, "gemm", "gemm"),
        (300, "gemm", "dequant_matmul"),
    ]
    assert all(r["copies_vq"] == 2 and r["copies_dense"] == 2 for r in rows)
    assert all(r["speedup_auto"] == 1.0 and r["auto_vs_best"] == 1.0 for r in rows)
    assert len(outputs) == 3 * (2 + 2 + 2) and all(y.shape[1:] == (24,) for y in outputs)


def test_target_shape_is_measured_first_in_every_format_and_dtype(bench):
    args = bench.parse_args([])
    order = bench.group_order(bench.plan(args), args)
    assert len(order) == 5 * 3 * 2 and len(set(order)) == len(order)
    assert {g[0] for g in order[:6]} == {"8192x8192"}  # before any other shape: a budget stop keeps the targets
    assert {(g[1], g[2]) for g in order[:6]} == {(f, d) for f in args.formats for d in args.dtypes}
    assert order[6] == ("4096x4096", "d8_2x8", "fp16")


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulator needs g++")
@pytest.mark.parametrize("path", ["smem_gemv", "smem_mma"])
def test_smem_kernels_are_checked_before_they_are_timed(bench, monkeypatch, path):
    """The shared-memory kernels (CPU emulator here) are timed only after their output matched decode-then-cuBLAS."""
    pytest.importorskip("triton")
    from vqlib.kernels import triton_vq as tv
    from vqlib.kernels import triton_vq_ops  # noqa: F401

    monkeypatch.setattr(bench, "time_graph", lambda calls, reps: 1e-3 * len([call() for call in calls]))
    torch.manual_seed(0)
    layers = [bench.make_layer(64, 24, "d8_2x8", "cpu") for _ in range(2)]
    x = torch.randn(1, 64).half()
    corrupt = {"on": False}

    def op(layer, path, tile=None):
        if path == "dequant_matmul":  # the reference stands in for decode-then-cuBLAS here
            return lambda: layer._reference_linear(x.float()).half()
        return lambda: torch.ops.vqlib.vq_linear(x, *tv.op_args(layer), path, tile) + (1.0 if corrupt["on"] else 0.0)

    seconds, err = bench.smem_time(layers, x, op, reps=1, path=path)
    assert seconds == 2e-3 and err < 2e-3  # both copies timed
    corrupt["on"] = True
    assert bench.smem_time(layers, x, op, reps=1, path=path)[0] is None
    assert bench.smem_time(layers, x.float(), op, reps=1, path=path) == (None, None)  # fp32: not covered, not timed


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulator needs g++")
def test_measure_group_when_the_smem_gemv_wins(bench, monkeypatch, cpu_registry):
    """fp16 on CPU (Triton interpreter + CUDA emulator), the dispatch's clock making the shared-memory GEMV fastest:
    the row names it as the op's path, times it, and reports its own check."""
    pytest.importorskip("triton")
    from vqlib.kernels import triton_crossover as tc
    from vqlib.kernels import triton_vq_ops  # noqa: F401

    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("VQLINEAR_KERNELS", "triton_vq_gemv,triton_vq_dequant_matmul,cuda_vq_smem_gemv")
    clock = {"gemv": 5.0, "dequant_matmul": 9.0, "smem_gemv": 2.0}
    monkeypatch.setattr(tc, "_time_path", lambda path, probe, args, flush, tile=None: clock[path] + (tile is not None))
    monkeypatch.setattr(bench, "time_graph", lambda calls, reps: 1e-3 * len([call() for call in calls]))
    rows = bench.measure_group("64x24", "d8_2x8", "fp16", [1], l2=1, reps=1, device="cpu")
    (row,) = rows
    assert row["auto"] == "smem_gemv" and row["auto_tile"] is None and "measured fastest" in row["auto_reason"]
    assert row["t_smem_us"] == row["t_auto_us"] == 2e3 and row["smem_max_err"] < 4e-3
    assert row["t_mma_us"] == 2e3 and row["mma_max_err"] < 4e-3  # the tensor-core kernel: checked, then timed
