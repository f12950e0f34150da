"""Tile plans of the Triton VQLinear kernels: the default plan of each path (shapes and SM count only, so a
captured graph replays the same launch) and the candidate plans the measured choice times (``triton_crossover``).

No triton import here: plans are plain data, encoded as ints for the ``tile`` argument of ``vqlib::vq_linear``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch

# ---- tile plans (one place; the GPU benchmark measures them) ------------------------------------
MAX_SPLIT_K = 16
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM
MIN_ITERS_PER_SPLIT = 4  # ... but keep at least this many K iterations in each split


@dataclass(frozen=True)
class TilePlan:
    block_b: int
    block_n: int
    block_v: int
    split_k: int = 1
    vec_per_split: int = 0  # 0: all vectors in one split
    num_warps: int = 4
    num_stages: int = 2
    swap_ab: bool = False  # gemm: weight rows on the MMA's M side (skinny token counts)
    prefetch: bool = False  # gemv: load the next tile's codes before decoding this one

    def encode(self) -> list[int]:
        """The plan as the ``tile`` argument of ``vqlib::vq_linear`` (ints: a custom op takes no dataclass)."""
        return [getattr(self, f.name) if f.type != "bool" else int(getattr(self, f.name)) for f in fields(self)]

    def describe(self) -> str:
        rows = f"{self.block_n} rows x {self.block_v} vectors" + (
            f" x {self.block_b} tokens" if self.block_b > 1 else ""
        )
        extras = [f"{self.num_warps} warps", f"split-K {self.split_k}"]
        extras += ["swap-AB"] * self.swap_ab + ["prefetch"] * self.prefetch
        return f"tiles of {rows}, " + ", ".join(extras)

    @classmethod
    def decode(cls, tile: list[int]) -> TilePlan:
        names = [f.name for f in fields(cls)]
        if len(tile) != len(names):
            raise ValueError(f"vq_linear: tile must hold {len(names)} ints ({', '.join(names)}), got {list(tile)}")
        return cls(**{f.name: bool(v) if f.type == "bool" else int(v) for f, v in zip(fields(cls), tile)})


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _with_split(
    plan: TilePlan,
    row_blocks: int,
    nv: int,
    device: torch.device,
    sms: int | None,
    programs_per_sm: int = PROGRAMS_PER_SM,
    min_iters: int = MIN_ITERS_PER_SPLIT,
) -> TilePlan:
    """Split the vector (K) loop so that tall or wide layers still launch enough programs."""
    if sms is None:
        sms = _device_sms(device)
    want = math.ceil(programs_per_sm * sms / max(1, row_blocks))
    most = max(1, nv // (plan.block_v * min_iters))
    split = max(1, min(want, most, MAX_SPLIT_K))
    return split_plan(plan, split, nv)


def split_plan(plan: TilePlan, split: int, nv: int) -> TilePlan:
    """``plan`` with the vectors cut into ``split`` ranges of whole BLOCK_V tiles (none empty)."""
    per = math.ceil(math.ceil(nv / max(1, split)) / plan.block_v) * plan.block_v
    return replace(plan, split_k=math.ceil(nv / per), vec_per_split=per)


def plan_tiles(
    path: str, batch: int, n: int, nv: int, dp: int, device: torch.device, sms: int | None = None, elem_bytes: int = 2
) -> TilePlan:
    """Default tiles for ``path`` (shape-based only, so a captured graph replays the same launch).
    ``sms`` (streaming multiprocessors) defaults to the device's; 1 on CPU (interpreter).
    ``elem_bytes`` 4 (float32 activations) shrinks the large GEMM tiles, which spill registers otherwise."""
    if sms is None:
        sms = _device_sms(device)
    return _plan_tiles(path, batch, n, nv, dp, sms, elem_bytes)


def _device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)  # shapes only; decoding asks the same plan for every token of every layer
def _plan_tiles(path: str, batch: int, n: int, nv: int, dp: int, sms: int, elem_bytes: int) -> TilePlan:
    device = torch.device("meta")  # sms is given: _with_split needs no device
    if path == "gemv":
        block_b = _pow2(batch)
        cols = 128 if block_b <= 2 else 64  # bound the (B, N, K) product held in registers
        plan = TilePlan(block_b, 32, max(1, cols // dp))
    elif path == "gemm" and batch <= 16:
        # swap_ab: weight rows fill the MMA's 64-row side (sm_90 wgmma; without it a 16-token tile
        # compiles to mma.sync), tokens its 16-wide side
        plan = TilePlan(16, 64, max(1, 64 // dp), num_stages=3, swap_ab=True)
    elif path == "gemm":
        block_b = 32 if batch <= 32 else 64 if batch <= 64 else 128
        plan = TilePlan(
            block_b, 128, max(1, 32 // dp), num_warps=8 if block_b == 128 else 4, num_stages=3, swap_ab=block_b <= 32
        )
        if elem_bytes > 2:  # float32: an IEEE fp32 dot runs on FMA units with large register tiles
            plan = replace(plan, block_b=min(block_b, 32), block_n=64, num_warps=4, swap_ab=False)
    elif path == "dequant":
        return TilePlan(1, 32, max(1, 64 // dp))
    else:
        raise ValueError(f"plan_tiles: expected path 'gemv', 'gemm' or 'dequant', got {path!r}")
    row_blocks = math.ceil(n / plan.block_n) * math.ceil(batch / plan.block_b)
    return _with_split(plan, row_blocks, nv, device, sms)


@dataclass(frozen=True)
class GemvVariant:
    """How a GEMV candidate differs from the default plan (None: keep the default's value)."""

    programs_per_sm: int  # split-K until about this many programs per SM
    prefetch: bool = False
    rows: int | None = None  # BLOCK_N
    width: int = 1  # BLOCK_V as a multiple of the default's
    warps: int | None = None


# Batch 1 is latency-bound unless ~30 KB of codes per SM are in flight (Little's law at H200 bandwidth and DRAM
# latency): more programs (split-K), larger tiles and the prefetch each add bytes in flight, at a cost in registers
# and in split-K partial sums. Which mix wins depends on the GPU and the shape, so the GPU measures
# (triton_crossover); these are the candidates.
GEMV_VARIANTS = (
    GemvVariant(8),
    GemvVariant(8, prefetch=True),
    GemvVariant(32, prefetch=True),
    GemvVariant(8, prefetch=True, rows=64, warps=4),
    GemvVariant(8, prefetch=True, width=2, warps=8),
)
GEMM_PROGRAMS_PER_SM = (8,)  # GEMM candidates: the default plan split deeper (its loads are pipelined by Triton)
# From WIDE_TOKENS_MIN_BATCH tokens (fp16/bf16), also a 256-token x 64-row tile on 8 warps: each weight tile is decoded
# once per 256 tokens instead of per 128 (the default), halving the CUDA-core decode that competes with the tensor
# cores (estimated at ~60% of their time at 128 tokens per decode: ~5 instructions per weight against 128 MACs);
# the fp32 accumulator stays at 64 registers per thread. Batch 1024's target (<= 1.1x fp16) rests on this or on
# decode-then-cuBLAS, whose dense-weight write alone is ~20% of the fp16 GEMM at 8192x8192 (docs/kernels.md).
WIDE_TOKENS_MIN_BATCH = 256


def tile_candidates(
    path: str, batch: int, n: int, nv: int, dp: int, device: torch.device, sms: int | None = None, elem_bytes: int = 2
) -> list[TilePlan]:
    """The tile plans the measured choice times for ``path``, the default (``plan_tiles``) first, no duplicates.
    Shapes only (no data), so a CUDA graph or compiled graph replays the plan chosen eagerly."""
    default = plan_tiles(path, batch, n, nv, dp, device, sms, elem_bytes)
    if path == "gemv":
        variants = [
            (
                replace(
                    default,
                    block_n=v.rows or default.block_n,
                    block_v=default.block_v * v.width,
                    num_warps=v.warps or default.num_warps,
                    prefetch=v.prefetch,
                ),
                v.programs_per_sm,
            )
            for v in GEMV_VARIANTS
        ]
    elif path == "gemm":
        variants = [(default, pps) for pps in GEMM_PROGRAMS_PER_SM]
        if batch >= WIDE_TOKENS_MIN_BATCH and elem_bytes == 2:
            wide = replace(default, block_b=256, block_n=64, num_warps=8, swap_ab=False)
            variants.append((wide, PROGRAMS_PER_SM))
    else:
        variants = []  # dequant: one plan
    plans = [default]
    for plan, pps in variants:
        row_blocks = math.ceil(n / plan.block_n) * math.ceil(batch / plan.block_b)
        plan = _with_split(plan, row_blocks, nv, device, sms, pps, min_iters=2)  # deeper splits, shorter loops
        if plan not in plans:
            plans.append(plan)
    return plans
