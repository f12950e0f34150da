"""Why the Triton kernels gather codebook vectors through L1 and not with ``tl.gather`` (docs/kernels.md).

Compiles, for sm_90 and without a GPU, two minimal GEMV loops that differ only in how a (256, 8) fp16
codebook is read: ``tl.gather`` on a register copy (Triton's only on-chip indexed read) vs a pointer
gather (the kernels' way: one 128-bit load per 8-dim vector, served by L1). Prints the instructions of
each in the PTX per loop iteration (32 rows x BV vectors x 8 weights, 128 threads).

    python benchmarks/ptx_gather_probe.py
"""

from __future__ import annotations

import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def gather_in_registers(codes_ptr, cb_ptr, x_ptr, out_ptr, NV, ITERS, BN: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    lane = tl.arange(0, 8)
    cb = tl.load(cb_ptr + tl.arange(0, 256)[:, None] * 8 + lane[None, :]).to(tl.float32)  # (256, 8) registers
    acc = tl.full((BN,), 0.0, tl.float32)
    for it in range(ITERS):
        v = it * BV + tl.arange(0, BV)
        code = tl.load(codes_ptr + n[:, None] * NV + v[None, :]).to(tl.int32)  # (BN, BV)
        idx = tl.reshape(code, (BN * BV, 1)) + lane[None, :] * 0  # (BN * BV, 8)
        w = tl.reshape(tl.gather(cb, idx, 0), (BN, BV * 8))
        xv = tl.load(x_ptr + tl.reshape(v[:, None] * 8 + lane[None, :], (BV * 8,))).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(out_ptr + n, acc)


@triton.jit
def gather_through_l1(codes_ptr, cb_ptr, x_ptr, out_ptr, NV, ITERS, BN: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    lane = tl.arange(0, 8)
    acc = tl.full((BN,), 0.0, tl.float32)
    for it in range(ITERS):
        v = it * BV + tl.arange(0, BV)
        code = tl.load(codes_ptr + n[:, None] * NV + v[None, :]).to(tl.int32)  # (BN, BV)
        w = tl.reshape(tl.load(cb_ptr + code[:, :, None] * 8 + lane[None, None, :]).to(tl.float32), (BN, BV * 8))
        xv = tl.load(x_ptr + tl.reshape(v[:, None] * 8 + lane[None, :], (BV * 8,))).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(out_ptr + n, acc)


SIGNATURE = {
    "codes_ptr": "*u8",
    "cb_ptr": "*fp16",
    "x_ptr": "*fp16",
    "out_ptr": "*fp32",
    "NV": "i32",
    "ITERS": "i32",
    "BN": "constexpr",
    "BV": "constexpr",
}
PATTERNS = {
    "shfl.sync": r"shfl\.sync",
    "selp": r"\bselp\.",
    "ld.global.v4": r"ld\.global(\.\w+)*\.v4",
    "fma": r"\bfma\.rn",
}


def main() -> None:
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    for fn in (gather_in_registers, gather_through_l1):
        for bv in (16, 32):
            src = triton.compiler.ASTSource(fn=fn, signature=SIGNATURE, constexprs={"BN": 32, "BV": bv}, attrs=attrs)
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
            counts = ", ".join(f"{name} {len(re.findall(p, ptx))}" for name, p in PATTERNS.items())
            print(f"{fn.__name__:<20} {32 * bv * 8:>5} weights/iteration: {counts}")


if __name__ == "__main__":
    main()
