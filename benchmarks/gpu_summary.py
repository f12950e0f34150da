"""Read one gpu_check.sh run: how close batch 1 comes to what its codebook gathers allow.

For the issue's target shape (8192x8192) at batch 1, per format and dtype, from ``bench_kernels_gpu.json``: cuBLAS
fp16/bf16 time, the dispatch's time (path and tile plan) and speed-up; from ``gather.json`` (bench_gather_gpu.py):
the time the layer's codebook gathers alone take as pointer loads (the kernels' way) and from shared memory (what
CUDA C++ could do), and the speed-up each floor would allow. A kernel near its pointer-gather floor is limited by
the gathers, and only a shared-memory codebook can lift it; one far above it is limited elsewhere (bytes in flight,
launch, split-K reduction).

    python benchmarks/gpu_summary.py gpu_check_out/        # the folder gpu_check.sh wrote; no GPU needed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGET_SHAPE = "8192x8192"
# benchmark format -> (gather probe codebook, gathers of the layer / 16.8 M): one gather per code
GATHER_KIND = {
    "d4_1x8": ("d4_fp16_256", 1.0),  # 4 weights per code
    "d8_2x8": ("d8_fp16_256", 1.0),  # two codes per 8 weights
    "d8_1x16": ("d8_fp16_65536", 0.5),  # one code per 8 weights, from L2
}


def summarize(gather: dict, bench: dict) -> list[dict]:
    """One row per (format, dtype) measured at TARGET_SHAPE and batch 1."""
    rows = []
    for r in bench["rows"]:
        if r["shape"] != TARGET_SHAPE or r["batch"] != 1 or r["fmt"] not in GATHER_KIND:
            continue
        kind, share = GATHER_KIND[r["fmt"]]
        books = gather.get("codebooks", {})
        pointer = books[kind]["us_per_16_8M"] * share if kind in books else None
        smem = [v["us_per_16_8M"] * share for k, v in books.items() if k.startswith(f"{kind}_smem_")]
        rows.append(
            dict(
                fmt=r["fmt"],
                dtype=r["dtype"],
                dense_us=r["t_dense_us"],
                auto_us=r["t_auto_us"],
                auto=r["auto"] + (f" ({r['auto_tile']})" if r.get("auto_tile") else ""),
                speedup=r["t_dense_us"] / r["t_auto_us"],
                pointer_floor_us=pointer,
                kernel_over_floor=None if pointer is None else r["t_auto_us"] / pointer,
                pointer_allows=None if pointer is None else r["t_dense_us"] / pointer,
                smem_kernel_us=r.get("t_smem_us"),
                smem_floor_us=min(smem) if smem else None,
                smem_allows=r["t_dense_us"] / min(smem) if smem else None,
                mma_kernel_us=r.get("t_mma_us"),
            )
        )
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    print(f"batch 1, {TARGET_SHAPE}: the dispatch vs the floors its codebook gathers set (target: 4x dense)")
    print(
        f"{'format':<8} {'dtype':<5} {'dense us':>9} {'auto us':>8} {'x dense':>8} {'gather floor us':>16} "
        f"{'auto/floor':>10} {'floor allows':>12} {'smem floor us':>14} {'smem allows':>11} {'smem kernel us':>14} {'mma kernel us':>13}  path"
    )
    for r in rows:
        print(
            f"{r['fmt']:<8} {r['dtype']:<5} {r['dense_us']:>9.1f} {r['auto_us']:>8.1f} {r['speedup']:>7.2f}x "
            f"{_fmt(r['pointer_floor_us'], '>16.1f')} {_fmt(r['kernel_over_floor'], '>10.2f')} "
            f"{_fmt(r['pointer_allows'], '>11.2f')}x {_fmt(r['smem_floor_us'], '>14.1f')} "
            f"{_fmt(r['smem_allows'], '>10.2f')}x {_fmt(r['smem_kernel_us'], '>14.1f')} "
            f"{_fmt(r['mma_kernel_us'], '>13.1f')}  {r['auto']}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="gpu_check.sh's output folder")
    args = parser.parse_args(argv)
    paths = {name: args.folder / name for name in ("gather.json", "bench_kernels_gpu.json")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        print(f"gpu_summary: expected {', '.join(missing)} (written by gpu_check.sh)", file=sys.stderr)
        return 2
    rows = summarize(
        json.loads(paths["gather.json"].read_text()), json.loads(paths["bench_kernels_gpu.json"].read_text())
    )
    print_table(rows)
    (args.folder / "summary.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
