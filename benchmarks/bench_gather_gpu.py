"""How fast can a GPU gather codebook entries? The ceiling of the fused batch-1 kernels, isolated.

A batch-1 VQ GEMV does one codebook gather per code: 16.8 M of them for an 8192x8192 layer at about 2 bits per
weight (d4 1x8 or d8 2x8). docs/kernels.md estimates, from NVIDIA's description of the L1 (4 cache-line tags per
cycle per request), that these gathers alone take 8-16 us on an H100/H200, i.e. a 2-4x ceiling over fp16's ~31 us
(the issue asks for 4x). This script measures that ceiling: a Triton kernel that draws pseudo-random codes in
registers (a linear congruential generator; no code bytes from memory) and gathers and sums the entries of one
codebook kept in L1/L2, exactly as the kernels do (one pointer load per entry), for the codebooks of the formats:

    d4 int8  256 x 4 B (1 KB)     d4 fp16  256 x 8 B (2 KB)     d8 fp16  256 x 16 B (4 KB)
    d8 fp16  65,536 x 16 B (1 MB, the 1x16 format: from L2)

and the fp16 batch-1 matmul of an 8192x8192 weight (cuBLAS, rotating 4 weight copies so L2 is cold), so the
printed ratio is the best speed-up any pointer-gather kernel can reach. CUDA events over 50 launches after a warm-up.

    python benchmarks/bench_gather_gpu.py [--out gather.json]      # ~15 s on an H100/H200; needs CUDA

If the ratio is near the kernels' measured speed-up (bench_kernels_gpu.py), the gathers are the limit and only a
shared-memory codebook (CUDA C++: bank-conflict cost, replicated tables as in AQLM) can lift it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

GATHERS = 8192 * 8192 // 4  # one per 4 weights: 8192x8192 in d4 1x8 (and in d8 2x8: two per 8 weights)
BLOCK_N, BLOCK_V = 32, 32  # codes per program and iteration: as the GEMV's default d4 tile
LCG_A, LCG_C = 1664525, 1013904223  # Numerical Recipes' 32-bit LCG
CODEBOOKS = {  # name -> (entries, vector_dim, dtype)
    "d4_int8_256": (256, 4, torch.int8),
    "d4_fp16_256": (256, 4, torch.float16),
    "d8_fp16_256": (256, 8, torch.float16),
    "d8_fp16_65536": (65536, 8, torch.float16),
}


@triton.jit
def gather_probe_kernel(
    cb_ptr, out_ptr, ITERS: tl.constexpr, KCB: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr
):
    """out[program] = sum over ITERS x (BN, BV) pseudo-random codes of the sum of their codebook entries.
    (Builtins only, ``tl.reduce`` with ``_sum_combine`` and a constexpr ITERS, so that the Triton interpreter runs
    it in the tests; see kernels/triton_vq_jit.py.)"""
    slot = tl.arange(0, BN)[:, None] * BV + tl.arange(0, BV)[None, :]  # (BN, BV)
    state = (tl.program_id(0) * BN * BV + slot).to(tl.uint32)
    lane = tl.arange(0, D)
    acc = tl.full((BN, BV, D), 0.0, tl.float32)
    for _ in range(ITERS):
        state = state * 1664525 + 1013904223  # LCG_A, LCG_C (uint32 arithmetic wraps)
        code = ((state >> 16) & (KCB - 1)).to(tl.int32)  # (BN, BV)
        acc += tl.load(cb_ptr + code[:, :, None] * D + lane[None, None, :]).to(tl.float32)
    total = tl.reduce(tl.reshape(acc, (BN * BV * D,)), 0, tl.standard._sum_combine)
    tl.store(out_ptr + tl.program_id(0), total)


def launch(codebook: torch.Tensor, programs: int, iters: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """codebook (entries, d); returns out (programs,) float32."""
    entries, d = codebook.shape
    if entries & (entries - 1) or d & (d - 1):
        raise ValueError(f"gather probe: entries and d must be powers of two, got {tuple(codebook.shape)}")
    out = torch.empty(programs, dtype=torch.float32, device=codebook.device) if out is None else out
    gather_probe_kernel[(programs,)](codebook, out, iters, KCB=entries, D=d, BN=BLOCK_N, BV=BLOCK_V, num_warps=4)
    return out


def reference(codebook: torch.Tensor, programs: int, iters: int) -> torch.Tensor:
    """The kernel's sums computed with torch (int64 arithmetic masked to 32 bits), for the tests."""
    slot = torch.arange(BLOCK_N * BLOCK_V, dtype=torch.int64)
    state = torch.arange(programs, dtype=torch.int64)[:, None] * BLOCK_N * BLOCK_V + slot  # (programs, BN*BV)
    entry_sums = codebook.float().sum(1)  # (entries,)
    total = torch.zeros(programs, dtype=torch.float64)
    for _ in range(iters):
        state = (state * LCG_A + LCG_C) & 0xFFFFFFFF
        total += entry_sums[(state >> 16) & (codebook.shape[0] - 1)].double().sum(1)
    return total


def _median_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) * 1e3 for s, e in events)[reps // 2]


def fp16_gemv_us(n: int = 8192, copies: int = 4) -> float:
    """Batch-1 fp16 x @ W^T for an n x n weight, rotating ``copies`` weights (4 x 134 MB: the L2 is cold)."""
    x = torch.randn(1, n, device="cuda", dtype=torch.float16)
    weights = [torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
    turn = iter(range(10**9))
    return _median_us(lambda: torch.matmul(x, weights[next(turn) % copies].t()))


def measure(sms: int) -> dict:
    programs = 8 * sms
    iters = max(1, round(GATHERS / (programs * BLOCK_N * BLOCK_V)))
    rows = {}
    for name, (entries, d, dtype) in CODEBOOKS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        cb = torch.randint(-100, 100, (entries, d), device="cuda", generator=gen).to(dtype)
        out = torch.empty(programs, dtype=torch.float32, device="cuda")
        us = _median_us(lambda cb=cb, out=out: launch(cb, programs, iters, out))
        gathers = programs * iters * BLOCK_N * BLOCK_V
        rows[name] = dict(
            us=us, gathers=gathers, us_per_16_8M=us * GATHERS / gathers, ggathers_per_s=gathers / us / 1e3
        )
    return dict(programs=programs, iters=iters, codebooks=rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gather_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    result = dict(gpu=props.name, sms=props.multi_processor_count, **measure(props.multi_processor_count))
    result["fp16_gemv_8192_us"] = fp16 = fp16_gemv_us()
    print(f"{props.name}, {props.multi_processor_count} SMs; fp16 batch-1 8192x8192 (cold L2): {fp16:.1f} us")
    print(f"{'codebook':<16} {'us per 16.8M gathers':>22} {'Ggathers/s':>11} {'ceiling vs fp16':>16}")
    for name, row in result["codebooks"].items():
        row["ceiling_vs_fp16"] = fp16 / row["us_per_16_8M"]
        print(
            f"{name:<16} {row['us_per_16_8M']:>22.1f} {row['ggathers_per_s']:>11.0f} {row['ceiling_vs_fp16']:>15.2f}x"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
