"""VQLinear on an NVIDIA GPU: fused Triton kernels vs cuBLAS fp16/bf16 vs decode-then-cuBLAS.

For each shape (``IN x OUT``: x (batch, IN) @ W^T -> (batch, OUT)), batch size, format and
activation dtype, three methods are timed:

- ``dense``: ``torch.matmul`` with an uncompressed weight in the activation dtype (cuBLAS);
- ``fused``: the Triton kernel the dispatch uses below the crossover (``gemv`` for batch <= 4,
  ``gemm`` on tensor cores above) in its default tile plan, measured at every batch so the crossover can
  be read off;
- ``dequant``: the decode kernel into a dense weight, then cuBLAS;
- ``smem`` (1-8 tokens, formats with 256-entry codebooks): the CUDA C++ shared-memory GEMV in its default plan
  (``cuda_smem_gemv``), after checking its output against ``dequant``;
- ``mma`` (1-16 tokens, the same formats): the CUDA C++ shared-memory decode into tensor-core fragments
  (``cuda_smem_mma``), default plan, checked the same way.

``auto`` is what ``vqlib.kernels`` picks: the path and tile plan (``auto_tile``; None: the default plan) its
own measurement found fastest for this shape, format, dtype and batch (``triton_crossover``); ``auto_vs_best`` (time of auto / the faster of fused and dequant
here) shows whether that choice holds under this script's protocol.
Every method runs inside a CUDA graph that calls it once on each of ``copies`` distinct weights,
with enough copies to exceed twice the L2 cache (a cold L2 on every call, as in a real model),
timed with CUDA events over several replays. Effective bandwidth counts the stored bytes of the
weight (codes + codebooks + scales for VQ; the dense weight for cuBLAS) per call, and is also given
as a fraction of the device-to-device copy bandwidth measured here (2 x bytes / time of a 2 GB
``copy_``). JSON (all numbers, the machine, the recommended crossover, the issue's targets met or
not) and a PNG plot are written to ``--out``.

    python benchmarks/bench_kernels_gpu.py                 # everything, < 5 minutes on an H100/H200
    python benchmarks/bench_kernels_gpu.py --quick         # 2 shapes, 3 batches, 2 formats, fp16
    python benchmarks/bench_kernels_gpu.py --dry-run       # print the plan (works without a GPU)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHAPES = ["4096x4096", "4096x14336", "14336x4096", "8192x8192", "8192x28672"]
BATCHES = [1, 4, 16, 64, 256, 1024]
# name -> (vector_dim, num_codebooks, codebook_bits): about 2 bits per weight each
FORMATS = {"d8_2x8": (8, 2, 8), "d4_1x8": (4, 1, 8), "d8_1x16": (8, 1, 16)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUICK = dict(shapes=["4096x4096", "8192x8192"], batches=[1, 16, 256], formats=["d8_2x8", "d4_1x8"], dtypes=["fp16"])
TARGET_SHAPE = "8192x8192"  # the batch-1 targets are stated for it
TARGETS = "batch 1 >= 4x dense and >= 60% of copy bandwidth at 8192x8192; batch 16 >= 2x; batch 1024 <= 1.1x dense time"


@dataclass
class Config:
    shape: str
    batch: int
    fmt: str
    dtype: str

    @property
    def in_out(self) -> tuple[int, int]:
        a, b = self.shape.split("x")
        return int(a), int(b)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="IN x OUT features")
    p.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help=f"subset: {QUICK}")
    p.add_argument("--reps", type=int, default=5, help="graph replays timed per measurement")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new configs after this many seconds")
    p.add_argument("--out", type=Path, default=Path("bench_kernels_gpu"), help="output prefix (.json, .png)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for shape in args.shapes:
        if len(shape.split("x")) != 2 or not all(s.isdigit() for s in shape.split("x")):
            p.error(f"--shapes: expected IN x OUT like 4096x14336, got {shape!r}")
    return args


def plan(args) -> list[Config]:
    return [Config(s, b, f, d) for d in args.dtypes for f in args.formats for s in args.shapes for b in args.batches]


def vq_bytes(in_f: int, out_f: int, fmt: str) -> int:
    """Stored bytes of one VQLinear of this format (codes + fp16 codebooks + fp16 row scales)."""
    d, m, b = FORMATS[fmt]
    nv = math.ceil(in_f / d)
    return out_f * nv * m * (1 if b <= 8 else 2) + m * 2**b * d * 2 + out_f * 2


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """Distinct weights to rotate through so that one pass over them is at least 2x the L2."""
    return max(2, math.ceil(2 * l2_bytes / max(1, nbytes)))


def group_order(configs: list[Config], args) -> list[tuple[str, str, str]]:
    """(shape, format, dtype) groups in measuring order: the target shape (8192x8192) in every format and dtype
    first, then the rest by dtype, format and shape, so a budget stop drops the least important groups."""
    return sorted(
        dict.fromkeys((c.shape, c.fmt, c.dtype) for c in configs),
        key=lambda g: (
            g[0] != TARGET_SHAPE,
            args.dtypes.index(g[2]),
            args.formats.index(g[1]),
            args.shapes.index(g[0]),
        ),
    )


def print_plan(configs: list[Config], l2_bytes: int) -> None:
    print(f"{len(configs)} configs x 3 methods; L2 assumed {l2_bytes / 2**20:.0f} MiB; targets: {TARGETS}")
    seen = set()
    for c in configs:
        in_f, out_f = c.in_out
        key = (c.shape, c.fmt)
        if key in seen:
            continue
        seen.add(key)
        vb, db = vq_bytes(in_f, out_f, c.fmt), in_f * out_f * 2
        print(
            f"  {c.shape:>11} {c.fmt:>7}: {8 * vb / (in_f * out_f):.3f} bits/weight, {vb / 1e6:7.1f} MB "
            f"(x{copies_for(vb, l2_bytes)} copies) vs dense {db / 1e6:7.1f} MB (x{copies_for(db, l2_bytes)})"
        )


# ---- measurement (GPU only) -------------------------------------------------------------------
def make_layer(in_f: int, out_f: int, fmt: str, device: str):
    from vqlib.compress import VQLinear

    d, m, b = FORMATS[fmt]
    layer = VQLinear(in_f, out_f, vector_dim=d, num_codebooks=m, codebook_bits=b, bias=False, device=device)
    layer.codebooks.normal_(0, 0.02)
    high = 2**b
    codes = torch.randint(0, high, layer.codes.shape, device=device)
    layer.codes.copy_(torch.where(codes >= 2**15, codes - 2**16, codes) if b > 8 else codes)
    layer.scales.uniform_(0.5, 1.5)
    return layer


def time_graph(calls, reps: int) -> float:
    """Seconds per call: the calls (one per weight copy) captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles kernels, settles the allocator
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / (reps * len(calls))


def copy_bandwidth(reps: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 2 GB buffer."""
    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_graph([functools.partial(dst.copy_, src)], reps)
    del src, dst
    return 2 * n / seconds


def measure_group(
    shape: str, fmt: str, dtype_name: str, batches: list[int], l2: int, reps: int, device: str = "cuda"
) -> list[dict]:
    """All batches of one (shape, format, dtype): the weights are built once. (``device`` is for the CPU test
    of this function under the Triton interpreter, with ``time_graph`` replaced.)"""
    from vqlib.kernels import explain, triton_crossover
    from vqlib.kernels import triton_vq as tv

    in_f, out_f = Config(shape, 1, fmt, dtype_name).in_out
    dtype = DTYPES[dtype_name]
    vb, db = vq_bytes(in_f, out_f, fmt), in_f * out_f * 2
    layers = [make_layer(in_f, out_f, fmt, device) for _ in range(copies_for(vb, l2))]
    dense = [torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02 for _ in range(copies_for(db, l2))]
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, device=device, dtype=dtype)
        fused_path = "gemv" if batch <= tv.GEMV_MAX_BATCH else "gemm"

        def op(layer, path, tile=None):
            return lambda: torch.ops.vqlib.vq_linear(x, *tv.op_args(layer), path, tile)

        t_dense = time_graph([(lambda w=w: torch.matmul(x, w.t())) for w in dense], reps)
        t_fused = time_graph([op(layer, fused_path) for layer in layers], reps)
        t_deq = time_graph([op(layer, "dequant_matmul") for layer in layers], reps)
        t_smem, smem_err = smem_time(layers, x, op, reps, "smem_gemv")
        t_mma, mma_err = smem_time(layers, x, op, reps, "smem_mma")
        with torch.no_grad():  # what the dispatch runs (its first call here times the paths: triton_crossover)
            decision = explain(layers[0], x)
        auto = tv.path_of(decision.path) or decision.path  # the op's path name ("reference" stays as it is)
        auto_tile = triton_crossover.ranking(layers[0], x, batch).tile(auto)  # None: the path's default plan
        timed = {fused_path: t_fused, "dequant_matmul": t_deq, "smem_gemv": t_smem, "smem_mma": t_mma}
        if timed.get(auto) is not None and auto_tile is None:
            t_auto = timed[auto]
        else:
            t_auto = time_graph([op(layer, auto, auto_tile) for layer in layers], reps)
        rows.append(
            dict(
                shape=shape,
                fmt=fmt,
                dtype=dtype_name,
                batch=batch,
                fused_path=fused_path,
                vq_bytes=vb,
                dense_bytes=db,
                copies_vq=len(layers),
                copies_dense=len(dense),
                t_dense_us=t_dense * 1e6,
                t_fused_us=t_fused * 1e6,
                t_dequant_us=t_deq * 1e6,
                auto=auto,
                auto_tile=None if auto_tile is None else triton_crossover.describe_tile(auto, auto_tile),
                auto_reason=decision.reason,
                t_auto_us=t_auto * 1e6,
                auto_vs_best=t_auto / min(t_fused, t_deq),
                speedup_auto=t_dense / t_auto,
                speedup_fused=t_dense / t_fused,
                speedup_dequant=t_dense / t_deq,
                t_smem_us=None if t_smem is None else t_smem * 1e6,
                speedup_smem=None if t_smem is None else t_dense / t_smem,
                smem_max_err=smem_err,
                t_mma_us=None if t_mma is None else t_mma * 1e6,
                speedup_mma=None if t_mma is None else t_dense / t_mma,
                mma_max_err=mma_err,
                gbps_fused=vb / t_fused / 1e9,
                gbps_dense=db / t_dense / 1e9,
            )
        )
        line = {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items() if k != "auto_reason"}
        print(json.dumps(line), flush=True)
    del layers, dense
    torch.cuda.empty_cache()
    return rows


def smem_time(layers: list, x: torch.Tensor, op, reps: int, path: str) -> tuple[float | None, float | None]:
    """(seconds, max error relative to max |output|) of a CUDA C++ shared-memory path (``smem_gemv``, ``smem_mma``)
    in its default plan, or None where it does not cover the format or batch. Its output is checked against
    decode-then-cuBLAS first: a wrong kernel is reported with its error, never timed."""
    from vqlib.kernels import triton_crossover
    from vqlib.kernels.triton_vq import cuda_cpp_module

    if cuda_cpp_module(path).format_reason(layers[0], x) is not None:
        return None, None
    try:
        got, expected = op(layers[0], path)(), op(layers[0], "dequant_matmul")()
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot load is reported, the benchmark goes on
        print(f"{path} failed: {type(exc).__name__}: {exc}", flush=True)
        return None, None
    ok, err = triton_crossover.agrees(got, expected)
    if not ok:
        print(f"{path} output differs from decode-then-cuBLAS (max error {err:.2e}): not timed", flush=True)
        return None, err
    return time_graph([op(layer, path) for layer in layers], reps), err


# ---- summary -----------------------------------------------------------------------------------
def crossovers(rows: list[dict]) -> dict:
    """Per (shape, format, dtype): the smallest measured batch from which decode-then-cuBLAS beats
    the fused kernel at every larger measured batch (None: fused always faster)."""
    out = {}
    for key in sorted({(r["shape"], r["fmt"], r["dtype"]) for r in rows}):
        group = sorted((r for r in rows if (r["shape"], r["fmt"], r["dtype"]) == key), key=lambda r: r["batch"])
        best = None
        for r in reversed(group):
            if r["t_dequant_us"] < r["t_fused_us"]:
                best = r["batch"]
            else:
                break
        out["/".join(key)] = best
    return out


def targets(rows: list[dict], copy_gbps: float) -> list[dict]:
    """The issue's targets (about 2 bits per weight, auto path), one line per measured row that applies."""
    checks = []
    for r in rows:
        if r["batch"] == 1 and r["shape"] == TARGET_SHAPE:
            frac = r["vq_bytes"] / (r["t_auto_us"] * 1e-6) / copy_gbps
            checks.append(dict(r=r, what="batch 1 speed-up >= 4x", value=r["speedup_auto"], met=r["speedup_auto"] >= 4))
            checks.append(dict(r=r, what="batch 1 >= 60% copy bandwidth", value=frac, met=frac >= 0.6))
        if r["batch"] == 16:
            checks.append(
                dict(r=r, what="batch 16 speed-up >= 2x", value=r["speedup_auto"], met=r["speedup_auto"] >= 2)
            )
        if r["batch"] == 1024:
            ratio = r["t_auto_us"] / r["t_dense_us"]
            checks.append(dict(r=r, what="batch 1024 time <= 1.1x dense", value=ratio, met=ratio <= 1.1))
    return [
        dict(
            shape=c["r"]["shape"],
            fmt=c["r"]["fmt"],
            dtype=c["r"]["dtype"],
            target=c["what"],
            value=round(c["value"], 3),
            met=bool(c["met"]),
        )
        for c in checks
    ]


def plot_pil(rows: list[dict], path: Path) -> str | None:
    """Fallback chart with Pillow (a torchvision dependency): speed-up of the auto path vs dense, log2
    axes, one panel per shape x dtype, one colour per format; the dotted line y = 1."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return "neither matplotlib nor Pillow installed: no plot"
    panels = sorted({(r["dtype"], r["shape"]) for r in rows})
    fmts = sorted({r["fmt"] for r in rows})
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    w, h, cols = 360, 260, 5
    img = Image.new("RGB", (w * min(cols, len(panels)), h * math.ceil(len(panels) / cols)), "white")
    draw = ImageDraw.Draw(img)
    batches = sorted({r["batch"] for r in rows})
    lo, hi = -3.0, 4.0  # log2 speed-up range shown: 1/8x .. 16x
    for i, (dt, shape) in enumerate(panels):
        ox, oy = (i % cols) * w, (i // cols) * h
        box = (ox + 40, oy + 25, ox + w - 10, oy + h - 30)

        def xy(batch, speedup, box=box):
            fx = batches.index(batch) / max(1, len(batches) - 1)
            fy = (min(hi, max(lo, math.log2(max(speedup, 1e-9)))) - lo) / (hi - lo)
            return box[0] + fx * (box[2] - box[0]), box[3] - fy * (box[3] - box[1])

        draw.rectangle(box, outline="black")
        draw.text((ox + 45, oy + 5), f"{shape} {dt}: speed-up vs dense (log2)", fill="black")
        draw.line([xy(batches[0], 1.0), xy(batches[-1], 1.0)], fill=(128, 128, 128))
        for e in (-2, 0, 2, 4):
            draw.text((ox + 5, xy(batches[0], 2.0**e)[1] - 6), f"{2.0**e:g}x", fill="black")
        for b in batches:
            draw.text((xy(b, 2**lo)[0] - 8, box[3] + 5), str(b), fill="black")
        for k, fmt in enumerate(fmts):
            pts = [
                xy(r["batch"], r["speedup_auto"])
                for r in sorted(rows, key=lambda r: r["batch"])
                if (r["dtype"], r["shape"], r["fmt"]) == (dt, shape, fmt)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colours[k % 4], width=2)
            draw.text((box[0] + 5, box[1] + 5 + 12 * k), fmt, fill=colours[k % 4])
    img.save(path)
    return None


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return plot_pil(rows, path)
    shapes = sorted(
        {r["shape"] for r in rows}, key=SHAPES.index if all(s in SHAPES for s in {r["shape"] for r in rows}) else str
    )
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(4 * len(shapes), 3.4 * len(dtypes)), squeeze=False)
    for i, dt in enumerate(dtypes):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            for k, fmt in enumerate(sorted({r["fmt"] for r in rows})):  # one colour per format in every panel
                sel = sorted(
                    (r for r in rows if (r["shape"], r["dtype"], r["fmt"]) == (shape, dt, fmt)),
                    key=lambda r: r["batch"],
                )
                if sel:
                    batches = [r["batch"] for r in sel]
                    ax.plot(batches, [r["speedup_auto"] for r in sel], marker="o", color=f"C{k}", label=f"{fmt} auto")
                    ax.plot(batches, [r["speedup_fused"] for r in sel], ls=":", color=f"C{k}", label=f"{fmt} fused")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(f"{shape} {dt}")
            ax.set_xlabel("batch (tokens)")
            if j == 0:
                ax.set_ylabel(f"speed-up vs dense {dt} (cuBLAS)")
            if ax.get_lines()[:-1]:  # one legend per panel: panels may hold different formats (a budget stop)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name,
        sms=props.multi_processor_count,
        memory_gb=round(props.total_memory / 1e9, 1),
        l2_bytes=getattr(props, "L2_cache_size", None),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )


def write_json(args, info: dict, copy_gbps: float, start: float, rows: list[dict], not_run: list[str]) -> dict:
    from vqlib.kernels import triton_vq as tv

    for r in rows:
        r["copy_fraction_fused"] = r["gbps_fused"] / copy_gbps
    result = dict(
        machine=info,
        copy_gbps=copy_gbps,
        seconds=time.perf_counter() - start,
        not_run=not_run,
        dequant_matmul_min_batch=tv.DEQUANT_MATMUL_MIN_BATCH,
        gemv_max_batch=tv.GEMV_MAX_BATCH,
        measured_crossover=crossovers(rows),
        targets=targets(rows, copy_gbps * 1e9),
        rows=rows,
        command=" ".join(sys.argv),
    )
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = plan(args)
    if args.dry_run:
        print_plan(configs, 60 * 2**20)
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: needs a CUDA device (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    from vqlib.kernels import triton_vq as tv

    if tv.unavailable_reason():
        print(f"bench_kernels_gpu: Triton kernels unavailable: {tv.unavailable_reason()}", file=sys.stderr)
        return 2
    info = machine()
    l2 = max(info["l2_bytes"] or 0, 50 * 2**20)
    print_plan(configs, l2)
    start = time.perf_counter()
    copy_gbps = copy_bandwidth() / 1e9
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows, skipped = [], []
    groups = group_order(configs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for i, (shape, fmt, dt) in enumerate(groups):
        if time.perf_counter() - start > args.budget_s:
            skipped.append("/".join((shape, fmt, dt)))
            continue
        rows += measure_group(shape, fmt, dt, args.batches, l2, args.reps)
        # written after every group: a run killed by an outer timeout still leaves its numbers
        result = write_json(args, info, copy_gbps, start, rows, skipped + ["/".join(g) for g in groups[i + 1 :]])
    result = write_json(args, info, copy_gbps, start, rows, skipped)
    note = plot(rows, Path(f"{args.out}.png"))
    print(
        f"\n{info['gpu']}: copy {copy_gbps:.0f} GB/s; {len(rows)} rows in {result['seconds']:.0f} s; "
        f"not run (time budget): {skipped or 'none'}"
    )
    print("measured crossover (decode-then-cuBLAS faster from batch):", json.dumps(result["measured_crossover"]))
    off = [r for r in rows if r["auto_vs_best"] > 1.05]
    print(f"dispatch's measured choice within 5% of the faster path here: {len(rows) - len(off)} of {len(rows)} rows")
    for r in off:
        print(
            f"  {r['shape']} {r['fmt']} {r['dtype']} batch {r['batch']}: {r['auto']} {r['auto_vs_best']:.2f}x the best"
        )
    for t in result["targets"]:
        print(
            f"  {'MET ' if t['met'] else 'MISS'} {t['target']:<32} {t['shape']:>11} {t['fmt']:>7} {t['dtype']}: {t['value']}"
        )
    print(f"wrote {args.out}.json" + (f" and {args.out}.png" if note is None else f" ({note})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
