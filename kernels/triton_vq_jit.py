"""Triton kernels for ``VQLinear`` (the format of ``vqlib.compress.format``, read as stored).

This file holds only ``@triton.jit`` functions. ``triton_vq`` imports it twice: once normally
(compiled kernels for CUDA tensors) and once as a separate module while ``TRITON_INTERPRET=1`` is
set (interpreted kernels that run on CPU tensors, used by the CPU test suite). Triton decides at
decoration time which of the two a function becomes, hence the two imports of one source.

Only builtins of ``triton.language`` are used (``tl.full`` not ``tl.zeros``, ``tl.reduce`` with
``tl.standard._sum_combine`` not ``tl.sum``): the library's own ``@jit`` helpers are compiled-mode
objects once triton is imported and the interpreted copy could not call them (the interpreter
recognises ``_sum_combine`` as a combine function and sums with numpy).

The K loop runs ``ITERS`` (= vectors per split / BLOCK_V) iterations, a runtime argument, so one
compiled kernel serves every in_features. The interpreter of triton 3.5 cannot use a runtime loop
bound with numpy >= 2.4 (it converts a 1-element array with ``int()``), so the interpreted copy
treats ``ITERS`` as a constexpr (``triton_vq_ops._interpreted_jit``).

Index conventions (see the format docstring): a weight tile is (BLOCK_N rows, BLOCK_V vectors,
DP lanes) where DP = next power of two >= d and lanes >= d are masked. Its input columns are
``v * D + lane``, so the tile flattens to (BLOCK_N, BLOCK_V * DP) and an activation tile loaded
with the same column map multiplies it directly; the padded lanes are zero on both sides.
"""

import triton
import triton.language as tl


@triton.jit
def _load_codes(
    codes_ptr,
    n_idx,
    v_idx,
    N,
    NV,
    V_END,
    M: tl.constexpr,
    MP: tl.constexpr,
    CODE16: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V, MP) int32 codes of a tile (MP = next power of two >= M; 0 where masked: rows >= N,
    vectors >= V_END, codebooks >= M). One load of each vector's M contiguous codes, kept apart from the
    decode so that the GEMV can issue the next tile's load before decoding this one (PREFETCH)."""
    m_idx = tl.arange(0, MP)
    ok = (n_idx < N)[:, None, None] & (v_idx < V_END)[None, :, None] & (m_idx < M)[None, None, :]
    ptrs = codes_ptr + (n_idx[:, None, None] * NV + v_idx[None, :, None]) * M + m_idx[None, None, :]
    code = tl.load(ptrs, mask=ok, other=0).to(tl.int32)
    if CODE16:
        code = code & 0xFFFF  # int16 storage holds the uint16 bit pattern
    return code


@triton.jit
def _code_of(codes, m, MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(BLOCK_N, BLOCK_V) codes of codebook m from a (BLOCK_N, BLOCK_V, MP) tile (in-thread select + sum)."""
    if MP == 1:
        return tl.reshape(codes, (BLOCK_N, BLOCK_V))
    pick = tl.arange(0, MP)[None, None, :] == m
    return tl.reduce(tl.where(pick, codes, 0), 2, tl.standard._sum_combine)


@triton.jit
def _decode_tile(
    codes,
    cb_ptr,
    cbs_ptr,
    sc_ptr,
    rowset_ptr,
    n_idx,
    v_idx,
    N,
    V_END,
    S,
    G,
    D: tl.constexpr,
    DP: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    KCB: tl.constexpr,
    GROUP_VECS: tl.constexpr,
    HAS_CBS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_GROUP_VECS: tl.constexpr,
    HAS_ROWSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(BLOCK_N, BLOCK_V, DP) float32 weight vectors of a tile whose codes (``_load_codes``) are given, zero
    outside the layer and for vectors >= V_END (the end of this program's K split).

    Same arithmetic and order as the reference ``decode_weight``: entry (int8 * codebook scale),
    summed over the M codebooks in order, then times the row/group scale, all in float32.
    """
    n_ok = n_idx < N  # (BN,)
    v_ok = v_idx < V_END  # (BV,)
    nv_ok = n_ok[:, None] & v_ok[None, :]  # (BN, BV)
    lane = tl.arange(0, DP)
    lane_ok = lane < D
    if GROUP_VECS > 0:
        grp = v_idx // GROUP_VECS  # (BV,) codebook group of each vector
    else:
        grp = v_idx * 0
    if HAS_ROWSET:
        # fused projections: each row names which layer's codebook set it reads
        rowset = tl.load(rowset_ptr + n_idx, mask=n_ok, other=0)
        cset = rowset[:, None] * G + grp[None, :]  # (BN, BV)
    else:
        cset = grp[None, :] + n_idx[:, None] * 0
    w = tl.full((BLOCK_N, BLOCK_V, DP), 0.0, tl.float32)
    for m in tl.static_range(M):
        code = _code_of(codes, m, MP, BLOCK_N, BLOCK_V)  # (BN, BV)
        entry = (cset * M + m) * KCB + code  # (BN, BV) row of the flattened codebooks
        vals = tl.load(
            cb_ptr + entry[:, :, None] * D + lane[None, None, :],
            mask=nv_ok[:, :, None] & lane_ok[None, None, :],
            other=0,
        ).to(tl.float32)
        if HAS_CBS:
            cscale = tl.load(cbs_ptr + cset * M + m, mask=nv_ok, other=0).to(tl.float32)
            vals = vals * cscale[:, :, None]
        w = w + vals
    if SCALE_MODE == 1:  # one scale per row
        rs = tl.load(sc_ptr + n_idx * S, mask=n_ok, other=0).to(tl.float32)
        w = w * rs[:, None, None]
    if SCALE_MODE == 2:  # one scale per row and scale group
        gs = tl.load(sc_ptr + n_idx[:, None] * S + (v_idx // SCALE_GROUP_VECS)[None, :], mask=nv_ok, other=0)
        w = w * gs.to(tl.float32)[:, :, None]
    return w


@triton.jit
def _tile_columns(v_idx, NV, K_IN, D: tl.constexpr, DP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Input column of each (vector, lane) of a tile, flattened to (BV * DP,), and its validity."""
    lane = tl.arange(0, DP)
    cols = v_idx[:, None] * D + lane[None, :]  # (BV, DP)
    ok = (lane[None, :] < D) & (v_idx[:, None] < NV) & (cols < K_IN)
    return tl.reshape(cols, (BLOCK_V * DP,)), tl.reshape(ok, (BLOCK_V * DP,))


@triton.jit
def vq_dequant_kernel(
    out_ptr,
    codes_ptr,
    cb_ptr,
    cbs_ptr,
    sc_ptr,
    rowset_ptr,
    N,
    NV,
    S,
    G,
    K_IN,
    D: tl.constexpr,
    DP: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    KCB: tl.constexpr,
    CODE16: tl.constexpr,
    GROUP_VECS: tl.constexpr,
    HAS_CBS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_GROUP_VECS: tl.constexpr,
    HAS_ROWSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Dense (N, K_IN) weight in out's dtype (the pad columns are dropped)."""
    n_idx = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    v_idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    codes = _load_codes(codes_ptr, n_idx, v_idx, N, NV, NV, M, MP, CODE16)  # (BN, BV, MP)
    w = _decode_tile(
        codes,
        cb_ptr,
        cbs_ptr,
        sc_ptr,
        rowset_ptr,
        n_idx,
        v_idx,
        N,
        NV,
        S,
        G,
        D,
        DP,
        M,
        MP,
        KCB,
        GROUP_VECS,
        HAS_CBS,
        SCALE_MODE,
        SCALE_GROUP_VECS,
        HAS_ROWSET,
        BLOCK_N,
        BLOCK_V,
    )
    cols, col_ok = _tile_columns(v_idx, NV, K_IN, D, DP, BLOCK_V)
    w2 = tl.reshape(w, (BLOCK_N, BLOCK_V * DP))
    mask = (n_idx[:, None] < N) & col_ok[None, :]
    tl.store(out_ptr + n_idx[:, None] * K_IN + cols[None, :], w2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_or_partial(
    acc, out_ptr, part_ptr, bias_ptr, b_idx, n_idx, BATCH, N, pid_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr
):
    """acc (BB, BN) float32: the output (+ bias, cast) when not split, else this split's partial sums."""
    mask = (b_idx[:, None] < BATCH) & (n_idx[None, :] < N)
    if not SPLIT:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + n_idx, mask=n_idx < N, other=0)
            acc = acc + bias.to(out_ptr.dtype.element_ty).to(tl.float32)[None, :]
        tl.store(out_ptr + b_idx[:, None] * N + n_idx[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * BATCH + b_idx[:, None]) * N + n_idx[None, :], acc, mask=mask)


@triton.jit
def vq_gemv_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    bias_ptr,
    codes_ptr,
    cb_ptr,
    cbs_ptr,
    sc_ptr,
    rowset_ptr,
    BATCH,
    N,
    NV,
    S,
    G,
    K_IN,
    stride_x,
    VEC_PER_SPLIT,
    D: tl.constexpr,
    DP: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    KCB: tl.constexpr,
    CODE16: tl.constexpr,
    GROUP_VECS: tl.constexpr,
    HAS_CBS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_GROUP_VECS: tl.constexpr,
    HAS_ROWSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    ITERS,
):
    """Small batch on CUDA cores: all BATCH rows (<= BLOCK_B) of x against BLOCK_N weight rows,
    over this program's split of the vectors; the weight is decoded in registers only.

    PREFETCH: the next tile's codes are loaded before this tile is decoded. Batch 1 is bound by how many
    code bytes are in flight (Little's law: ~30 KB per SM at H200 bandwidth and ~0.8 us latency), and
    Triton's pipeliner only stages loads that feed ``tl.dot``, so the GEMV double-buffers by hand."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_idx = tl.arange(0, BLOCK_B)
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    v_lo = pid_k * VEC_PER_SPLIT
    v_hi = tl.minimum(v_lo + VEC_PER_SPLIT, NV)
    if PREFETCH:
        next_codes = _load_codes(codes_ptr, n_idx, v_lo + tl.arange(0, BLOCK_V), N, NV, v_hi, M, MP, CODE16)
    for it in range(ITERS):
        v_idx = v_lo + it * BLOCK_V + tl.arange(0, BLOCK_V)
        if PREFETCH:
            codes = next_codes  # (BN, BV, MP)
            next_codes = _load_codes(codes_ptr, n_idx, v_idx + BLOCK_V, N, NV, v_hi, M, MP, CODE16)
        else:
            codes = _load_codes(codes_ptr, n_idx, v_idx, N, NV, v_hi, M, MP, CODE16)  # (BN, BV, MP)
        w = _decode_tile(
            codes,
            cb_ptr,
            cbs_ptr,
            sc_ptr,
            rowset_ptr,
            n_idx,
            v_idx,
            N,
            v_hi,
            S,
            G,
            D,
            DP,
            M,
            MP,
            KCB,
            GROUP_VECS,
            HAS_CBS,
            SCALE_MODE,
            SCALE_GROUP_VECS,
            HAS_ROWSET,
            BLOCK_N,
            BLOCK_V,
        )
        # round the weight to the activation dtype, as the reference's dense weight is
        w2 = tl.reshape(w.to(x_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N, BLOCK_V * DP))
        cols, col_ok = _tile_columns(v_idx, v_hi, K_IN, D, DP, BLOCK_V)
        x = tl.load(
            x_ptr + b_idx[:, None] * stride_x + cols[None, :],
            mask=(b_idx[:, None] < BATCH) & col_ok[None, :],
            other=0,
        ).to(tl.float32)  # (BB, BV * DP)
        acc += tl.reduce(x[:, None, :] * w2[None, :, :], 2, tl.standard._sum_combine)
    _store_or_partial(acc, out_ptr, part_ptr, bias_ptr, b_idx, n_idx, BATCH, N, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def vq_gemm_kernel(
    x_ptr,
    out_ptr,
    part_ptr,
    bias_ptr,
    codes_ptr,
    cb_ptr,
    cbs_ptr,
    sc_ptr,
    rowset_ptr,
    BATCH,
    N,
    NV,
    S,
    G,
    K_IN,
    stride_x,
    VEC_PER_SPLIT,
    D: tl.constexpr,
    DP: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    KCB: tl.constexpr,
    CODE16: tl.constexpr,
    GROUP_VECS: tl.constexpr,
    HAS_CBS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_GROUP_VECS: tl.constexpr,
    HAS_ROWSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SPLIT: tl.constexpr,
    ITERS,
    IEEE: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """Tensor cores: a (BLOCK_B, BLOCK_V*DP) activation tile times the decoded (BLOCK_N, BLOCK_V*DP)
    weight tile (decoded in registers, rounded to the activation dtype), float32 accumulation."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    b_idx = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    acc_t = tl.full((BLOCK_N, BLOCK_B), 0.0, tl.float32)
    v_lo = pid_k * VEC_PER_SPLIT
    v_hi = tl.minimum(v_lo + VEC_PER_SPLIT, NV)
    for it in range(ITERS):
        v_idx = v_lo + it * BLOCK_V + tl.arange(0, BLOCK_V)
        codes = _load_codes(codes_ptr, n_idx, v_idx, N, NV, v_hi, M, MP, CODE16)  # (BN, BV, MP)
        w = _decode_tile(
            codes,
            cb_ptr,
            cbs_ptr,
            sc_ptr,
            rowset_ptr,
            n_idx,
            v_idx,
            N,
            v_hi,
            S,
            G,
            D,
            DP,
            M,
            MP,
            KCB,
            GROUP_VECS,
            HAS_CBS,
            SCALE_MODE,
            SCALE_GROUP_VECS,
            HAS_ROWSET,
            BLOCK_N,
            BLOCK_V,
        )
        w = w.to(x_ptr.dtype.element_ty)
        cols, col_ok = _tile_columns(v_idx, v_hi, K_IN, D, DP, BLOCK_V)
        x_ok = (b_idx[:, None] < BATCH) & col_ok[None, :]
        if SWAP_AB:  # weight rows as the MMA's M side (>= 64), tokens as its N side: skinny batches
            w2 = tl.reshape(w, (BLOCK_N, BLOCK_V * DP))
            xt = tl.trans(tl.load(x_ptr + b_idx[:, None] * stride_x + cols[None, :], mask=x_ok, other=0))
            if IEEE:  # float32 activations: no TF32 rounding, so fp32 results match the reference
                acc_t = tl.dot(w2, xt, acc_t, input_precision="ieee")
            else:
                acc_t = tl.dot(w2, xt, acc_t)
        else:
            # (BN, BV, DP) -> (BV*DP, BN): K-major B operand
            wt = tl.reshape(tl.permute(w, (1, 2, 0)), (BLOCK_V * DP, BLOCK_N))
            x = tl.load(x_ptr + b_idx[:, None] * stride_x + cols[None, :], mask=x_ok, other=0)  # (BB, BV*DP)
            if IEEE:
                acc = tl.dot(x, wt, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, wt, acc)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    _store_or_partial(acc, out_ptr, part_ptr, bias_ptr, b_idx, n_idx, BATCH, N, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def splitk_reduce_kernel(
    part_ptr, out_ptr, bias_ptr, BATCH, N, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr
):
    """out[b, n] = sum over splits (fixed order: deterministic) + bias, cast to out's dtype."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < BATCH * N
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * BATCH * N + idx, mask=ok, other=0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + idx % N, mask=ok, other=0)
        acc += bias.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=ok)
