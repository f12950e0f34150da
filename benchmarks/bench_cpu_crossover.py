"""Where the lookups stop paying on this CPU: a CPU kernel's lookups vs dequant + BLAS vs dense fp32.

Times the two paths of the kernel directly (its ``_lookups`` and ``cpu_lut.dequant_blas``, whatever dispatch
would pick) next to ``F.linear`` on a dense fp32 weight, in ms per layer, median of 5 rounds in which the three
take turns over 4 distinct layers; then prints the limit the kernel's ``lut_max_batch`` chose from its cost
model (kernels/cpu_crossover.py). ``--kernel`` picks ``cpu_lut_avx512`` (default where the CPU has AVX-512
VBMI) or ``cpu_lut`` (fp32 tables, every x86-64 CPU). These calls are compute-bound (16+ tokens), so the short chain measures them
fairly; batch-1 speed is bench_kernels_cpu.py's job.

    python benchmarks/bench_cpu_crossover.py                          # the shapes of docs/kernels.md, 2 threads
    python benchmarks/bench_cpu_crossover.py --shapes 4096x4096 --formats 4/1 --threads 1 2
    python benchmarks/bench_cpu_crossover.py --kernel cpu_lut --tokens 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_description, setup_threads  # noqa: E402
from bench_kernels_cpu import random_vq  # noqa: E402
from vqlib.kernels import cpu_lut, cpu_lut_avx512  # noqa: E402

CHAIN = 4
REPS = 5


def median_ms(fns: list) -> list[float]:
    """Median ms per layer of each fn(i) over the chain, the fns taking turns each round."""
    for fn in fns:
        fn(0)
    times = [[] for _ in fns]
    for _ in range(REPS):
        for t, fn in zip(times, fns):
            start = time.perf_counter()
            for i in range(CHAIN):
                fn(i)
            t.append((time.perf_counter() - start) / CHAIN * 1e3)
    return [statistics.median(t) for t in times]


def row(kernel, n_in: int, n_out: int, d: int, m: int, tokens: list[int]) -> str:
    layers = [random_vq(n_in, n_out, dict(vector_dim=d, num_codebooks=m)) for _ in range(CHAIN)]
    dense = [torch.randn(n_out, n_in) for _ in range(CHAIN)]
    cells = []
    for b in tokens:
        x = torch.randn(b, n_in)
        fns = [
            lambda i: kernel._lookups(layers[i], x),
            lambda i: cpu_lut.dequant_blas(layers[i], x),
            lambda i: F.linear(x, dense[i]),
        ]
        cells.append(" / ".join(f"{ms:.2f}" for ms in median_ms(fns)))
    limit = kernel.lut_max_batch(layers[0])
    return f"| {n_in}x{n_out} d{d} {m}x8 | " + " | ".join(cells) + f" | {limit} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["576x1536", "1536x576", "4096x4096"])
    parser.add_argument("--formats", nargs="+", default=["4/1", "4/2"], help="d/M, e.g. 4/1 8/2")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--kernel", choices=["cpu_lut_avx512", "cpu_lut"], default=None)
    args = parser.parse_args()
    missing = cpu_lut_avx512.isa_missing()
    name = args.kernel or ("cpu_lut" if missing else "cpu_lut_avx512")
    if name == "cpu_lut_avx512" and missing is not None:
        raise SystemExit(f"cpu_lut_avx512 cannot run here ({missing}); use --kernel cpu_lut")
    kernel = {"cpu_lut": cpu_lut, "cpu_lut_avx512": cpu_lut_avx512}[name]
    kernel.load_numba()
    cpu_lut.load_numba()
    print(f"# bench_cpu_crossover, {name} ({machine_description()})")
    for threads in args.threads:
        setup_threads(threads)
        print(f"\n## {threads} thread(s): ms per layer, lookups / dequant + BLAS / dense fp32")
        print("| shape, format | " + " | ".join(f"{b} tokens" for b in args.tokens) + " | lut_max_batch |")
        print("|---|" + "---|" * (len(args.tokens) + 1))
        for shape in args.shapes:
            n_in, n_out = map(int, shape.split("x"))
            for fmt in args.formats:
                d, m = map(int, fmt.split("/"))
                print(row(kernel, n_in, n_out, d, m, args.tokens), flush=True)


if __name__ == "__main__":
    main()
