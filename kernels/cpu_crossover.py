"""Where the CPU kernels' lookups stop paying: a cost model of this CPU, measured once per process and kernel
(``cpu_lut_avx512``'s integer tables and ``cpu_lut``'s fp32 tables cost differently).

Why measured at run time: the crossover between the lookup path and dequant + BLAS moves by more than 10x
between CPUs that both run the kernel (docs/kernels.md, 4096x4096, d4 1x8, 2 threads): on a Zen 4 host the
lookups stay ahead of dequant + BLAS beyond 1,024 tokens, on a Xeon host (AMX, twice the fp32 BLAS speed,
slower byte permutes) only up to about 100, and for a 1536x576 layer in d4 2x8 below 16. A constant tuned on
one host made prefill 2-7x slower than dequant + BLAS, and slower than the reference path, on the other.

Both paths are linear in the number of tokens ``b`` (docs/kernels.md):

    lookups:         b * (lookups * lookup_ns + table_macs * table_ns)
    dequant + BLAS:  weights * dequant_ns + b * weights * mac_ns

with ``lookups = out * n_vec * M`` (one per code and token) and ``table_macs = in * M * 256`` (each table
entry is a d-long dot product). ``measure()`` times both paths on three small synthetic layers at two token
counts each (the differences cancel the per-call cost) and solves for the four constants: about 75 ms, once per
process. The limit is rounded down to a power of two so that timing noise rarely moves it.
``VQLIB_CPU_LUT_MAX_TOKENS=N`` pins it on every host (reproducible runs, debugging).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

ENV_MAX_TOKENS = "VQLIB_CPU_LUT_MAX_TOKENS"
TABLE_ENTRIES = 256  # the kernel's tables always hold 256 entries (fewer codebook bits are zero-padded)
LUT_PROBE_TOKENS = (16, 64)
BLAS_PROBE_TOKENS = (16, 256)  # wider: its per-token cost is small next to its dequantization
REPS = 5  # fastest of REPS timings: the machine is shared, noise only adds time


@dataclass(frozen=True)
class HostCosts:
    """Nanoseconds per unit of work on this CPU, at the thread count of the measurement."""

    lookup_ns: float  # one table lookup (per code and token)
    table_ns: float  # one multiply-add building the tables (per token)
    dequant_ns: float  # dequantizing one weight (once per call)
    mac_ns: float  # one multiply-add of the BLAS matmul (per weight and token)

    def lut_max_tokens(self, n_in: int, n_out: int, d: int, m: int, cap: int) -> int:
        """Most tokens for which the lookups are predicted no slower than dequant + BLAS (1..cap, a power of 2)."""
        n_vec = -(-n_in // d)
        weights = n_out * n_in
        lut_per_token = n_out * n_vec * m * self.lookup_ns + n_in * m * TABLE_ENTRIES * self.table_ns
        extra_per_token = lut_per_token - weights * self.mac_ns
        if extra_per_token <= 0:
            return cap
        tokens = weights * self.dequant_ns / extra_per_token
        return max(1, min(cap, 1 << int(math.log2(max(tokens, 1.0)))))


_measured: dict[str, HostCosts] = {}  # kernel name -> its costs on this CPU


def pinned_max_tokens(cap: int) -> int | None:
    """The limit set with VQLIB_CPU_LUT_MAX_TOKENS, or None; a value outside 1..cap raises."""
    raw = os.environ.get(ENV_MAX_TOKENS, "")
    if raw == "":
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= cap:
        raise ValueError(f"{ENV_MAX_TOKENS} must be a number of tokens from 1 to {cap}, got {raw!r}")
    return int(raw)


def host_costs(kernel: str, run_lut, run_blas) -> HostCosts:
    """This process' measured costs of ``kernel`` (measured on first use, at the thread count of that moment).

    Once per process, not per thread count: both paths scale alike with threads, and one limit keeps a
    call's result the same whatever the thread count (the kernel's outputs do not depend on it)."""
    if kernel not in _measured:
        _measured[kernel] = measure(run_lut, run_blas)
    return _measured[kernel]


def lut_max_tokens(kernel: str, layer, run_lut, run_blas, cap: int) -> int:
    """Most tokens per call for which ``kernel`` looks up (1..cap); more go to dequant + BLAS.
    ``VQLIB_CPU_LUT_MAX_TOKENS`` pins it; otherwise the first call measures this CPU (about 75 ms)."""
    pinned = pinned_max_tokens(cap)
    if pinned is not None:
        return pinned
    costs = host_costs(kernel, run_lut, run_blas)
    return costs.lut_max_tokens(layer.in_features, layer.out_features, layer.vector_dim, layer.num_codebooks, cap)


def _seconds(fn, layer, tokens: int) -> float:
    x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
    fn(layer, x)  # first call prepares the layer's arrays
    best = math.inf
    for _ in range(REPS):
        start = time.perf_counter()
        fn(layer, x)
        best = min(best, time.perf_counter() - start)
    return best


def _slope_and_fixed(fn, layer, tokens: tuple[int, int]) -> tuple[float, float]:
    """(ns per token, ns at zero tokens) of fn on layer, from its times at two token counts."""
    lo, hi = tokens
    t_lo, t_hi = _seconds(fn, layer, lo) * 1e9, _seconds(fn, layer, hi) * 1e9
    slope = max(t_hi - t_lo, 0.0) / (hi - lo)
    return slope, max(t_lo - lo * slope, 0.0)


def _probe_layer(n_in: int, n_out: int):
    from vqlib.compress.format import VQLinear

    layer = VQLinear(n_in, n_out, vector_dim=4, num_codebooks=1, group_size=128, codebook_dtype="int8")
    gen = torch.Generator().manual_seed(n_in * n_out)
    layer.codes.copy_(torch.randint(0, 256, layer.codes.shape, generator=gen).to(layer.codes.dtype))
    layer.codebooks.copy_(torch.randint(-127, 128, layer.codebooks.shape, generator=gen).to(layer.codebooks.dtype))
    return layer


def measure(run_lut, run_blas) -> HostCosts:
    """Time ``run_lut(layer, x)`` (lookups) and ``run_blas(layer, x)`` (dequant + BLAS) on probe layers."""
    wide, deep = _probe_layer(512, 2048), _probe_layer(2048, 128)  # lookup-heavy, table-heavy (d4 1x8)
    square = _probe_layer(1024, 1024)
    # Warm-up: the first ~0.5 s of a process' first calls (thread team start, first touches) ran 2x slow, which
    # moved the limits by 2x (measured: 653 vs 355 us for the same call).
    _slope_and_fixed(run_lut, wide, LUT_PROBE_TOKENS), _slope_and_fixed(run_blas, square, BLAS_PROBE_TOKENS)
    equations = []
    for layer in (wide, deep):
        slope, _ = _slope_and_fixed(run_lut, layer, LUT_PROBE_TOKENS)
        lookups = layer.out_features * layer.num_vectors
        equations.append((lookups, layer.in_features * TABLE_ENTRIES, slope))
    (a1, b1, s1), (a2, b2, s2) = equations
    det = a1 * b2 - a2 * b1
    lookup_ns = max((s1 * b2 - s2 * b1) / det, 0.0)
    table_ns = max((a1 * s2 - a2 * s1) / det, 0.0)
    slope, fixed = _slope_and_fixed(run_blas, square, BLAS_PROBE_TOKENS)
    weights = square.in_features * square.out_features
    return HostCosts(lookup_ns, table_ns, dequant_ns=fixed / weights, mac_ns=slope / weights)


__all__ = ["ENV_MAX_TOKENS", "HostCosts", "host_costs", "lut_max_tokens", "measure", "pinned_max_tokens"]
