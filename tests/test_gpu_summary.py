"""benchmarks/gpu_summary.py on made-up gpu_check.sh output: batch 1 at 8192x8192 set against its gather floors."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_summary.py"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _bench_row(fmt, batch=1, shape="8192x8192", dense=32.0, auto=16.0, tile=None):
    return dict(shape=shape, fmt=fmt, dtype="fp16", batch=batch, t_dense_us=dense, t_auto_us=auto, auto="gemv",
                auto_tile=tile)  # fmt: skip


GATHER = {
    "codebooks": {
        "d4_fp16_256": {"us_per_16_8M": 10.0},
        "d4_fp16_256_smem_x1": {"us_per_16_8M": 6.0},
        "d4_fp16_256_smem_x4": {"us_per_16_8M": 4.0},
        "d8_fp16_65536": {"us_per_16_8M": 20.0},
    }
}


def test_floors_per_format(summary):
    bench = {"rows": [
        _bench_row("d4_1x8", tile="tiles of 32 rows x 32 vectors, 4 warps, split-K 16, prefetch"),
        _bench_row("d8_1x16", auto=40.0),
        _bench_row("d4_1x8", batch=16),  # not batch 1
        _bench_row("d4_1x8", shape="4096x4096"),  # not the target shape
        _bench_row("d8_2x8"),  # its codebook kind was not measured
    ]}  # fmt: skip
    rows = summary.summarize(GATHER, bench)
    assert [(r["fmt"], r["dtype"]) for r in rows] == [("d4_1x8", "fp16"), ("d8_1x16", "fp16"), ("d8_2x8", "fp16")]
    d4, d16, d8 = rows
    assert d4["speedup"] == 2.0 and d4["pointer_floor_us"] == 10.0 and d4["kernel_over_floor"] == 1.6
    assert d4["pointer_allows"] == 3.2 and d4["smem_floor_us"] == 4.0 and d4["smem_allows"] == 8.0
    assert d4["auto"] == "gemv (tiles of 32 rows x 32 vectors, 4 warps, split-K 16, prefetch)"
    assert d16["pointer_floor_us"] == 10.0 and d16["smem_floor_us"] is None  # half the gathers; no smem probe at 1 MB
    assert d8["pointer_floor_us"] is None and d8["kernel_over_floor"] is None


def test_main_reads_the_folder_and_writes_summary(summary, tmp_path, capsys):
    assert summary.main([str(tmp_path)]) == 2
    assert "gather.json" in capsys.readouterr().err
    (tmp_path / "gather.json").write_text(json.dumps(GATHER))
    (tmp_path / "bench_kernels_gpu.json").write_text(json.dumps({"rows": [_bench_row("d4_1x8")]}))
    assert summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "d4_1x8" in out and "2.00x" in out and "8.00x" in out
    assert json.loads((tmp_path / "summary.json").read_text())[0]["smem_allows"] == 8.0
