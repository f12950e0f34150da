"""The shared-memory codebook kernel on tensor cores (``smem_mma`` in ``cuda/vq_smem_gemv.cu``): ``VQLinear`` at
1-16 tokens on CUDA, one more path of the measured dispatch (``triton_crossover``), named ``smem_mma``.

Why it exists: the shared-memory GEMV (``cuda_smem_gemv``) pays D fp32 multiply-adds per vector per token, so from a
few tokens on its arithmetic costs more than the memory it saves; batch 16 (the issue's ">= 2x fp16" target) is
then left to the Triton GEMM, which gathers its codebook entries through L1 like the Triton GEMV. This kernel does
the GEMV's shared-memory decode once per weight and multiplies 16 rows x 16 columns by 8 tokens per ``mma.sync``
(Marlin and QTIP decode straight into tensor-core fragments too). A lane decodes whole vectors: the K order inside
an mma is free as long as both operands agree (layout in the .cu). It has not run on a GPU: the dispatch picks it
only where it was measured faster than the other paths on the GPU at hand, after its output matched the layer's
reference there (``triton_crossover.CHECKED_AGAINST_REFERENCE``).

Covered: the GEMV's formats (uint8 codes, vector_dim 4 or 8, M 1 or 2, per-layer or grouped codebooks, fp16 or int8
codebooks, row / group / no scales, bias), fp16 and bf16 activations, 1-16 tokens (templates for 8 and 16).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .cuda_smem_gemv import (
    BLOCK_SMEM_BUDGET,
    BLOCKS_PER_SM,
    THREADS,
    SmemLayout,
    SmemPlan,
    _device_limits,
    covered_reason,
    entry_bytes,
    launch,
    layer_reason,
)

MAX_TOKENS = 16
TOKEN_TEMPLATES = (8, 16)  # instantiated in the .cu: one or two n8 tiles of mma.m16n8k16
WARPS = THREADS // 32
MIN_COPY_BYTES = 32  # replicas kept before a chunk is narrowed: copies * entry bytes (see _plan)


def token_template(tokens: int) -> int:
    return next(t for t in TOKEN_TEMPLATES if t >= tokens)


def lane_vectors(vector_dim: int, num_codebooks: int, tokens: int) -> int:
    """J, the vectors a lane owns per row (``mma_lane_vectors`` in the .cu): J*M code bytes in one load of at most
    16, and the B fragments of J*D columns for 8-16 tokens in at most 32 registers."""
    return min(16 // num_codebooks, 64 // (vector_dim * (token_template(tokens) // 8)))


LAYOUT = SmemLayout("shared-memory tensor-core kernel", MAX_TOKENS, token_template, lane_vectors)


@dataclass(frozen=True)
class MmaTile:
    """A measured variant of the default plan (``tile`` of ``vqlib::vq_linear`` for path ``smem_mma``); 0 keeps
    the default of a field."""

    copies: int = 0  # replicas of each codebook entry in shared memory (a power of two)
    rows_per_block: int = 0
    warps_k: int = 0  # warps side by side along K (1, 2, 4 or 8): fewer, more row tiles per pass

    def encode(self) -> list[int]:
        return [self.copies, self.rows_per_block, self.warps_k]

    @classmethod
    def decode(cls, tile: list[int]) -> "MmaTile":
        pow2_or_0 = all(v & (v - 1) == 0 for v in (tile[0], tile[2])) if len(tile) == 3 else False
        if len(tile) != 3 or min(tile) < 0 or tile[2] > WARPS or not pow2_or_0:
            raise ValueError(
                "smem_mma tile: expected [copies (0 or a power of two), rows_per_block >= 0, "
                f"warps_k (0 or a power of two <= {WARPS})], got {tile}"
            )
        return cls(*tile)

    def describe(self) -> str:
        parts = [
            f"{self.copies} copies of each entry" if self.copies else "",
            f"{self.rows_per_block} rows per block" if self.rows_per_block else "",
            f"{self.warps_k} warps along K" if self.warps_k else "",
        ]
        return "shared-memory tensor-core plan: " + (", ".join(p for p in parts if p) or "default")


Tile = MmaTile  # the plan variant class of this path (triton_vq.CUDA_CPP_PATHS)


def shape_reason(
    codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x_dtype, tokens, memory: bool = True
) -> str | None:
    """Why the kernel cannot run this format / input (None: it can); as ``cuda_smem_gemv.shape_reason``."""
    return covered_reason(
        LAYOUT, codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x_dtype, tokens, memory
    )


def format_reason(layer, x: Tensor) -> str | None:
    """``shape_reason`` for a layer and an input."""
    return layer_reason(LAYOUT, layer, x)


def plan(codes, codebooks, vector_dim, group_size, tokens, bf16, device, tile: MmaTile | None = None) -> SmemPlan:
    """Grid, shared memory and warp layout of one call (the format passed ``shape_reason``)."""
    n, nv, m = codes.shape
    k, int8 = codebooks.shape[2], codebooks.dtype == torch.int8
    sms, smem_limit = _device_limits(torch.device(device))
    return _plan(n, nv, m, k, int8, vector_dim, group_size, tokens, bf16, sms, smem_limit, tile or MmaTile())


def table_entry_bytes(vector_dim: int, int8: bool, bf16: bool) -> int:
    """Bytes of a codebook entry in shared memory: as stored, except with bf16 activations, whose table holds bf16
    values (fp16 entries rounded, int8 entries times their codebook scale, rounded: see decode_vector_h2)."""
    return 2 * vector_dim if bf16 else entry_bytes(vector_dim, int8)


def reduce_bytes(tokens: int) -> int:
    """Shared memory for the warps' partial tiles: two buffers x warps x (16 rows x 8 tokens) fp32 per n8 tile."""
    return 2 * WARPS * (token_template(tokens) // 8) * 128 * 4


@functools.lru_cache(maxsize=1024)
def _plan(n, nv, m, k, int8, vector_dim, group_size, tokens, bf16, sms, smem_limit, tile: MmaTile) -> SmemPlan:
    t, vl, eb = token_template(tokens), lane_vectors(vector_dim, m, tokens), table_entry_bytes(vector_dim, int8, bf16)
    budget = min(smem_limit, BLOCK_SMEM_BUDGET)
    copies = tile.copies or 128 // eb  # interleaved: one warp phase hits distinct banks whatever the codes
    warps_k = tile.warps_k or WARPS
    group_vecs = group_size // vector_dim

    def groups_per_chunk(warps_k: int) -> int:  # powers of two: one divides the other (shape_reason)
        chunk = warps_k * 4 * vl
        return 1 if not group_vecs or group_vecs % chunk == 0 else chunk // group_vecs

    def smem(warps_k: int, copies: int) -> int:
        table = groups_per_chunk(warps_k) * (m * k * copies * eb + 4 * m)
        return (table + 15) // 16 * 16 + 16 + reduce_bytes(tokens)  # + the zero entry of the lanes past the row

    # To fit: fewer copies down to MIN_COPY_BYTES per entry slot first, then narrower chunks (fewer groups per table),
    # then fewer copies. Why this order: a narrower chunk means more K splits, and at 16 tokens the fp32 partials of
    # d4 int8 groups of 128 at one warp along K would be twice the code bytes (written and read again), while 4-way
    # replication of 4-byte entries costs an estimated <= 2 shared-memory wavefronts per gather instead of 1.
    floor = max(1, MIN_COPY_BYTES // eb)
    while smem(warps_k, copies) > budget:
        if copies > floor and not tile.copies:
            copies //= 2
        elif warps_k > 1 and groups_per_chunk(warps_k) > 1 and not tile.warps_k:
            warps_k //= 2
        elif copies > 1 and not tile.copies:
            copies //= 2
        else:
            raise ValueError(f"smem_mma: {smem(warps_k, copies)} B of shared memory per block above {budget}")
    chunks = math.ceil(nv / (warps_k * 4 * vl))
    rows_per_pass = WARPS // warps_k * 16
    row_blocks = max(1, math.ceil(BLOCKS_PER_SM * sms / chunks))
    rows = tile.rows_per_block or math.ceil(n / row_blocks)
    rows = rows_per_pass * math.ceil(rows / rows_per_pass)
    name = f"vq_smem_mma_d{vector_dim}_m{m}_t{t}_{'bf16' if bf16 else 'f16'}_{'i8' if int8 else 'f16'}"
    grid = (math.ceil(n / rows), chunks)
    return SmemPlan(name, grid, smem(warps_k, copies), 0, rows, groups_per_chunk(warps_k), copies, warps_k)


def tile_candidates(layer, x: Tensor) -> list[list[int] | None]:
    """The default plan (None) and the variants the dispatch times: no replication (bank conflicts, but more blocks
    per SM and groups per chunk), 4x the rows per block (fewer table fills), 2 warps along K (a chunk a quarter as
    wide: 4x the row tiles per pass and, for grouped codebooks, fewer groups per table), and where the default gave up
    replicas to keep the chunk wide (grouped codebooks), full replication in a narrower chunk."""
    from .triton_vq import tokens

    bf16 = x.dtype == torch.bfloat16
    base = plan(layer.codes, layer.codebooks, layer.vector_dim, layer.group_size or 0, tokens(x), bf16, x.device)
    variants = [MmaTile(copies=1), MmaTile(rows_per_block=4 * base.rows_per_block)]
    if base.warps_k > 2:
        variants.append(MmaTile(warps_k=2))
    full = 128 // table_entry_bytes(layer.vector_dim, layer.codebooks.dtype == torch.int8, bf16)
    if base.copies < full:  # the default gave up replicas to keep the chunk wide: try them back, narrower
        variants.append(MmaTile(copies=full))
    return [None] + [v.encode() for v in variants if v.copies != base.copies or not v.copies]


def linear(
    x,
    codes,
    codebooks,
    codebook_scales,
    scales,
    bias,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    tile: list[int] | None = None,
) -> Tensor:
    """x (..., in_features) -> (..., out) in x's dtype. Arguments as ``vqlib::vq_linear``'s."""
    args = (codes, codebooks, codebook_scales, scales, bias, rowset, in_features, vector_dim, group_size)
    return launch("smem_mma", shape_reason, plan, MmaTile, x, *args, scale_group_size, tile)
