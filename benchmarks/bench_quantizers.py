"""vqlib vs vector-quantize-pytorch: time per training step and peak memory at large codebooks.

Both libraries run on the same inputs and the same initial codes (a training-mode forward + backward
of the quantizer alone: 8192 tokens of dim 256 by default), one configuration per fresh child process
so that peak memory is measured in isolation:

    python benchmarks/bench_quantizers.py                       # full table, 2 threads, CPU
    python benchmarks/bench_quantizers.py --sizes 65536 --simvq # one size, plus the SimVQ variants
    python benchmarks/bench_quantizers.py --device cuda         # GPU (peak = torch.cuda.max_memory_allocated)

Configurations (identical on both sides, --estimator switches both):
    ema:   vqlib.VectorQuantize(dim, K, decay=0.99, commitment_weight=0.25, gradient_estimator=E)
           vector_quantize_pytorch.VectorQuantize(dim=dim, codebook_size=K, decay=0.99,
               commitment_weight=0.25, kmeans_init=False, rotation_trick=E == "rotation")
    simvq: vqlib.VectorQuantize(dim, K, reparam="simvq", codebook_update="gradient", ...)
           vector_quantize_pytorch.SimVQ(dim=dim, codebook_size=K, rotation_trick=...)
Both start from the same code vectors (vqlib's initial codes are copied into vector-quantize-pytorch),
so the first step's indices must agree; the table reports that agreement as a correctness check.

Memory. CPU: peak resident set (kernel VmHWM, reset after imports, input and code creation) minus the
RSS at that point, i.e. everything the quantizer's construction and steps added. CUDA:
torch.cuda.max_memory_allocated() minus the allocation at the same point. Every CPU child runs under
an RLIMIT_DATA cap (--mem-limit-gb), so a configuration that needs more fails cleanly with "OOM"
instead of taking the machine down; children run one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    GB,
    load_average,
    machine_description,
    mem_available_bytes,
    peak_is_resettable,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    setup_threads,
)

TARGET_SPEEDUP = 4.0
TARGET_MEMORY_RATIO = 1 / 8
TARGET_SIZE = 65536
OOM_SIZE = 262144
MEMORY_RESERVE_GB = 1.5


# ---------------------------------------------------------------------------------------------------
# child: one library, one configuration
# ---------------------------------------------------------------------------------------------------
def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def build_quantizer(lib: str, variant: str, dim: int, size: int, estimator: str, codes, device):
    """The quantizer under test, starting from ``codes`` (ema: the code vectors; simvq: (basis, map))."""
    import torch

    if lib == "vqlib":
        import vqlib

        if variant == "ema":
            q = vqlib.VectorQuantize(
                dim, size, decay=0.99, commitment_weight=0.25, gradient_estimator=estimator, init_codebook=codes
            )
        else:
            q = vqlib.VectorQuantize(
                dim,
                size,
                reparam="simvq",
                codebook_update="gradient",
                commitment_weight=0.25,
                gradient_estimator=estimator,
            )
            cb = q.codebooks[0]
            with torch.no_grad():
                cb.basis.copy_(codes[0])
                cb.proj.weight.copy_(codes[1])
        return q.to(device).train()

    import vector_quantize_pytorch as vqpt

    rotation = estimator == "rotation"
    if variant == "ema":
        q = vqpt.VectorQuantize(
            dim=dim,
            codebook_size=size,
            decay=0.99,
            commitment_weight=0.25,
            kmeans_init=False,
            rotation_trick=rotation,
        )
        with torch.no_grad():
            q._codebook.embed.copy_(codes[None])
            q._codebook.embed_avg.copy_(codes[None])
    else:
        q = vqpt.SimVQ(dim=dim, codebook_size=size, rotation_trick=rotation)
        with torch.no_grad():
            q.frozen_codebook.copy_(codes[0])
            q.code_transform.weight.copy_(codes[1])
    return q.to(device).train()


def initial_codes(variant: str, dim: int, size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    if variant == "ema":
        return torch.randn(size, dim, generator=gen)
    basis = torch.randn(size, dim, generator=gen) * dim**-0.5
    return basis, torch.randn(dim, dim, generator=gen) * dim**-0.5


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if not on_cuda and args.mem_limit_gb > 0:
        import resource

        cap = int(args.mem_limit_gb * GB)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    setup_threads(args.threads)
    if args.lib == "vqlib":
        import vqlib  # noqa: F401  (imports before the baseline)
    else:
        import vector_quantize_pytorch  # noqa: F401

    gen = torch.Generator().manual_seed(args.seed)
    x_cpu = torch.randn(1, args.tokens, args.dim, generator=gen)
    target = torch.randn(1, args.tokens, args.dim, generator=gen).to(device)
    x = x_cpu.to(device).requires_grad_(True)
    codes = initial_codes(args.variant, args.dim, args.size, args.seed)

    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        baseline = rss_bytes()

    def peak() -> float:
        used = torch.cuda.max_memory_allocated(device) if on_cuda else peak_rss_bytes()
        return (used - baseline) / GB

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    result = {"lib": args.lib, "variant": args.variant, "size": args.size, "load_before": load_average()}
    times: list[float] = []
    first_indices = None
    try:
        q = build_quantizer(args.lib, args.variant, args.dim, args.size, args.estimator, codes, device)
        del codes
        for step in range(args.warmup + args.steps):
            x.grad = None
            q.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            quantized, indices, loss = q(x)
            total = loss.sum() + (quantized - target).pow(2).mean()
            total.backward()
            sync()
            elapsed = time.perf_counter() - start
            if step == 0:
                first_indices = indices.reshape(-1).cpu()
            if step >= args.warmup:
                times.append(elapsed)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err):
            raise
        result.update(status="oom", peak_gb=peak(), error=str(err).splitlines()[0][:200])
        return result
    result.update(
        status="ok",
        sec_per_step=sum(times) / len(times),
        min_sec=min(times),
        peak_gb=peak(),
        peak_method="cuda.max_memory_allocated" if on_cuda else ("VmHWM" if peak_is_resettable() else "ru_maxrss"),
        load_after=load_average(),
        indices_file=None,
    )
    if args.indices_out:
        np.save(args.indices_out, first_indices.numpy())
        result["indices_file"] = args.indices_out
    return result


# ---------------------------------------------------------------------------------------------------
# parent: one child per (size, library, variant), then the table
# ---------------------------------------------------------------------------------------------------
def effective_cap_gb(args: argparse.Namespace) -> float:
    """The per-child memory cap: --mem-limit-gb, lowered to what the machine has free (less a reserve)
    so that a capped child can never push the whole machine into the kernel's OOM killer."""
    if args.device != "cpu" or args.mem_limit_gb <= 0:
        return args.mem_limit_gb
    avail = mem_available_bytes()
    if avail is None:
        return args.mem_limit_gb
    return max(1.0, round(min(args.mem_limit_gb, avail / GB - MEMORY_RESERVE_GB), 1))


def run_child(args: argparse.Namespace, lib: str, variant: str, size: int, indices_out: str) -> dict:
    cap = effective_cap_gb(args)
    if cap != args.mem_limit_gb:
        print(
            f"  note: cap lowered to {cap} GB (only {mem_available_bytes() / GB:.1f} GB free on the machine)",
            flush=True,
        )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--lib",
        lib,
        "--variant",
        variant,
        "--size",
        str(size),
        "--dim",
        str(args.dim),
        "--tokens",
        str(args.tokens),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--estimator",
        args.estimator,
        "--seed",
        str(args.seed),
        "--mem-limit-gb",
        str(cap),
        "--indices-out",
        indices_out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]), cap=cap)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    # A child killed by the kernel (SIGKILL, rc -9) ran out of memory outside our cap.
    status = "oom" if proc.returncode in (-9, 137) else "error"
    return {"lib": lib, "variant": variant, "size": size, "status": status, "cap": cap, "error": " | ".join(tail)[:300]}


def index_agreement(a: dict, b: dict) -> float | None:
    if not (a.get("indices_file") and b.get("indices_file")):
        return None
    ia, ib = (np.load(r["indices_file"], allow_pickle=False) for r in (a, b))
    return float((ia == ib).mean())


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def describe(r: dict, key: str, spec: str) -> str:
    if r["status"] == "oom":
        return f"OOM@{r.get('cap', '?')}GB"
    if r["status"] != "ok":
        return "error"
    return fmt(r[key], spec)


def main(args: argparse.Namespace) -> None:
    import tempfile

    setup_threads(args.threads)
    print(f"machine: {machine_description(args.device)}")
    print(
        f"config: dim={args.dim} tokens={args.tokens} warmup={args.warmup} timed steps={args.steps} "
        f"estimator={args.estimator} device={args.device}"
        + (f" memory cap={args.mem_limit_gb} GB (RLIMIT_DATA per child)" if args.device == "cpu" else "")
    )
    variants = ["ema", "simvq"] if args.simvq else ["ema"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vqbench-") as tmp:
        for variant in variants:
            for size in args.sizes:
                pair = {}
                for lib in args.libs:
                    r = run_child(args, lib, variant, size, os.path.join(tmp, f"{lib}-{variant}-{size}.npy"))
                    pair[lib] = r
                    if r["status"] == "ok":
                        what = f"{r['sec_per_step']:.3f} s/step, peak {r['peak_gb']:.2f} GB"
                    else:
                        what = f"{r['status']} under the {r.get('cap')} GB cap: {r.get('error')}"
                    print(
                        f"  {variant:5s} K={size:<7d} {lib:5s} {what}, load {fmt(r.get('load_before'), '.1f')}",
                        flush=True,
                    )
                if "vqlib" in pair and "vqpt" in pair:
                    pair["agree"] = index_agreement(pair["vqlib"], pair["vqpt"])
                rows.append((variant, size, pair))
    print_table(rows, args)


def print_table(rows, args: argparse.Namespace) -> None:
    print()
    print(
        "| variant | K | vqlib s/step | vqpt s/step | speedup | vqlib peak GB | vqpt peak GB | memory ratio | index agreement |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for variant, size, pair in rows:
        a, b = pair.get("vqlib"), pair.get("vqpt")
        both_ok = a is not None and b is not None and a["status"] == b["status"] == "ok"
        speedup = b["sec_per_step"] / a["sec_per_step"] if both_ok else None
        ratio = a["peak_gb"] / b["peak_gb"] if both_ok and b["peak_gb"] > 0 else None
        print(
            f"| {variant} | {size} | {describe(a, 'sec_per_step', '.3f') if a else '-'} | "
            f"{describe(b, 'sec_per_step', '.3f') if b else '-'} | {fmt(speedup, '.1f') + 'x' if speedup else '-'} | "
            f"{describe(a, 'peak_gb', '.3f') if a else '-'} | {describe(b, 'peak_gb', '.2f') if b else '-'} | "
            f"{fmt(ratio, '.3f')} | {fmt(pair.get('agree'), '.4f')} |"
        )
        if variant != "ema" or a is None or b is None:
            continue
        if size == TARGET_SIZE:
            verdicts.append(
                f"speedup at {size} >= {TARGET_SPEEDUP:g}x: "
                + _verdict(speedup, speedup is not None and speedup >= TARGET_SPEEDUP, f"{fmt(speedup, '.1f')}x")
            )
            verdicts.append(
                f"peak memory at {size} <= 1/8 of vqpt: "
                + _verdict(ratio, ratio is not None and ratio <= TARGET_MEMORY_RATIO, f"ratio {fmt(ratio, '.3f')}")
            )
        if size == OOM_SIZE:
            ok = a["status"] == "ok" and b["status"] == "oom"
            verdicts.append(
                f"{size}: vqlib runs where vqpt runs out of memory: "
                + ("PASS" if ok else "FAIL")
                + f" (vqlib {a['status']}, vqpt {b['status']})"
            )
    if verdicts:
        print()
        for v in verdicts:
            print("target " + v)
    if args.device == "cpu":
        print(
            "\nnote: CPU cores may be shared; 'load' (1-min load average before each child) above the thread count "
            "means other work competed for the cores and times are pessimistic for both libraries."
        )


def _verdict(value, ok: bool, shown: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} ({shown})" if value is not None else "n/a (not measured)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 16384, 65536, 262144])
    p.add_argument("--libs", type=lambda s: s.split(","), default=["vqlib", "vqpt"], help="subset of vqlib,vqpt")
    p.add_argument("--simvq", action="store_true", help="also compare the SimVQ reparameterisation")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps after warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--estimator",
        choices=["rotation", "ste"],
        default="rotation",
        help="gradient estimator on both sides (vector-quantize-pytorch defaults to the rotation trick)",
    )
    p.add_argument("--mem-limit-gb", type=float, default=18.0, help="RLIMIT_DATA per CPU child; 0 = none")
    p.add_argument("--seed", type=int, default=0)
    # child-only flags
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", choices=["vqlib", "vqpt"], help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=["ema", "simvq"], default="ema", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--indices-out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    unknown = set(args.libs) - {"vqlib", "vqpt"}
    if unknown:
        p.error(f"--libs: unknown {sorted(unknown)}, expected a subset of vqlib,vqpt")
    return args


if __name__ == "__main__":
    cli = parse_args()
    if cli.worker:
        print("RESULT " + json.dumps(run_worker(cli)), flush=True)
    else:
        main(cli)
