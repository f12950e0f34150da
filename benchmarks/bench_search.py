"""Exact nearest-code search on CPU: vqlib's blocked torch GEMM, Faiss with its default settings, and
Faiss as vqlib calls it (blocked-GEMM path forced for the call), side by side on the same inputs.

faiss-cpu 1.15 answers a ``knn`` call with fewer than ``distance_compute_blas_threshold`` (128,000)
queries one query at a time for low-dimensional data; vqlib lowers the threshold for its own calls
(``vqlib.core.search.faiss_blas_path``). Every row also checks that the three give the same indices.

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --codebook-sizes 65536 --dims 4 8 --queries 4096

``--lloyd``: one weighted k-means (Lloyd) step instead, as ``vqlib.core.kmeans`` runs it: the fused
numba pass (``vqlib.core.lloyd``: search and sums together) against Faiss' search plus the bincount
update, with the rule that picks between them (d <= 8, k <= 1,024).

    python benchmarks/bench_search.py --lloyd
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_description, setup_threads  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def set_up(args, what: str):
    """Both tables: torch's and Faiss' thread counts, the machine line and the header; returns faiss."""
    import faiss

    setup_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"machine: {machine_description()}; faiss {faiss.__version__}")
    print(f"{what}, best of", args.repeats, "calls, milliseconds\n")
    return faiss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codebook-sizes", type=int, nargs="+", default=[4096, 65536])
    p.add_argument("--dims", type=int, nargs="+", default=[4, 8, 32, 256])
    p.add_argument("--queries", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lloyd", action="store_true", help="time one weighted k-means step instead (see above)")
    args = p.parse_args(argv)
    if args.lloyd:
        lloyd_table(args)
        return

    from vqlib.core.search import faiss_blas_path, nearest_code

    faiss = set_up(args, "exact nearest-code search")
    print(
        "| codes | dim | queries | vqlib torch blocked | Faiss default | Faiss as vqlib calls it | default / vqlib | same indices |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for k in args.codebook_sizes:
        for d in args.dims:
            codes = torch.randn(k, d, generator=g)
            xb = codes.numpy()
            for n in args.queries:
                x = torch.randn(n, d, generator=g)
                xq = x.numpy()

                def faiss_default():
                    return torch.from_numpy(faiss.knn(xq, xb, 1)[1][:, 0])

                def faiss_vqlib():
                    with faiss_blas_path(faiss):
                        return torch.from_numpy(faiss.knn(xq, xb, 1)[1][:, 0])

                t_torch, i_torch = best_time(lambda: nearest_code(x, codes, backend="torch"), args.repeats)
                t_default, i_default = best_time(faiss_default, args.repeats)
                t_vqlib, i_vqlib = best_time(faiss_vqlib, args.repeats)
                same = torch.equal(i_torch, i_default) and torch.equal(i_default, i_vqlib)
                print(
                    f"| {k} | {d} | {n} | {t_torch * 1e3:.1f} | {t_default * 1e3:.1f} | {t_vqlib * 1e3:.1f} | "
                    f"{t_default / t_vqlib:.1f}x | {'yes' if same else 'NO'} |",
                    flush=True,
                )


def lloyd_table(args) -> None:
    from vqlib.core import kmeans as km
    from vqlib.core import lloyd
    from vqlib.core.search import nearest_code

    set_up(args, "one weighted Lloyd step (nearest centroid + weighted sums)")
    print(
        "| points | dim | centroids | fused (numba) | Faiss search + bincount | ratio | same assignment | used by k-means |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    g = torch.Generator().manual_seed(0)
    lloyd.fused_lloyd_applies(torch.zeros(1, 4), torch.zeros(2, 4))  # compile / load outside the timings
    for n, d, k in [
        (18432, 4, 256),
        (49152, 4, 256),
        (49152, 8, 256),
        (16384, 2, 256),
        (16384, 16, 256),
        (4096, 4, 4096),
    ]:
        x, c, w = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g), torch.rand(n, generator=g)
        weighted = torch.cat([x * w[:, None], w[:, None]], 1).double()

        def plain():
            assign = nearest_code(x, c, backend="faiss")
            return assign, km._sums(weighted, assign, k)

        t_fused, (a_fused, _) = best_time(lambda: lloyd.lloyd_step(x, c, w), args.repeats)
        t_plain, (a_plain, _) = best_time(plain, args.repeats)
        used = "fused" if lloyd.fused_lloyd_applies(x, c) else "Faiss"  # the rule k-means itself applies
        print(
            f"| {n} | {d} | {k} | {t_fused * 1e3:.2f} | {t_plain * 1e3:.2f} | {t_plain / t_fused:.2f}x | "
            f"{'yes' if torch.equal(a_fused, a_plain) else 'NO'} | {used} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
