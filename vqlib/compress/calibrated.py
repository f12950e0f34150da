"""Calibration-aware VQ (GPTVQ / VPTQ style) of one layer given its input Hessian H = X^T X / n.

1. Hessian-weighted k-means initialises each codebook group from the current (error-corrected)
   weights, with vectors weighted by how much their error costs (squared scale / U_ii^2).
2. GPTQ column loop over vectors of d columns, in blocks with lazy batched updates. With U the
   upper Cholesky factor of H^-1 (H^-1 = U^T U), quantizing the d columns S jointly costs
   ||(w_S - q_S) U_SS^-1||^2 per row and is compensated optimally by
   W_R -= (w_S - q_S) U_SS^-1 U_SR for the later columns R (d = 1 is exactly GPTQ). The code is
   chosen under that metric: nearest neighbour after mapping vectors and codebook by U_SS^-1.
3. Fine-tune with the codes fixed: the output error tr((Q - W) H (Q - W)^T) is quadratic in the
   codebooks (solved by Jacobi-preconditioned conjugate gradient) and in the scales (solved
   exactly per row), alternated; kept only if it lowers the error after storage rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from vqlib.core.seeds import derive_seed

from .code_sweep import sweep_codes
from .codebooks import VQParts, assign_additive, column_scales, rms_scales, round_codebook
from .config import VQConfig
from .data_free import fit_group, group_vector_ranges, pad_columns
from .format import flat_code_index, vector_group_index
from .gptq_loop import compiled_loop_applies
from .gptq_loop import quantize_block as quantize_block_compiled


def damped_hessian(hessian: Tensor, damping: float) -> tuple[Tensor, float, Tensor]:
    """Dead inputs (zero diagonal, e.g. padding) get a unit diagonal; then add lam = damping * mean diag.

    Returns (damped H, lam, dead-input mask)."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    lam = damping * float(diag.mean())
    diag += lam
    return h, lam, dead


def inverse_hessian_factor(hessian: Tensor) -> Tensor:
    """Upper Cholesky factor U of H^-1 (float64 factorisation for stability, float32 result).

    float64 matters here: with float32 factorisations SmolLM2-135M's perplexity came out 1.2% worse
    on two seeds (22.38 -> 22.61, 22.06 -> 22.35; docs/llm.md), though the mean layer error did not move."""
    h = hessian.double()
    for attempt in range(6):
        try:
            lower = torch.linalg.cholesky(h)
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float()
        except torch.linalg.LinAlgError:
            # Numerically indefinite: add more damping, as GPTQ users do by hand.
            h = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * 0.1 * torch.diagonal(h).mean() * 10**attempt
    raise ValueError("the calibration Hessian could not be factorised even with heavy damping")


def pad_hessian(hessian: Tensor, size: int) -> Tensor:
    pad = size - hessian.shape[0]
    return torch.nn.functional.pad(hessian, (0, pad, 0, pad)) if pad else hessian


def regression_target(weight: Tensor, weighted_cross: Tensor, h_damped: Tensor, lam: float, dead: Tensor) -> Tensor:
    """W* = (W C + lam W)(H + lam I)^-1 with W C = ``weighted_cross`` and C = X_ref^T X / n: the weight
    whose outputs on the compressed-model inputs X best match the original outputs X_ref W^T, pulled
    towards W where the calibration data says nothing (ridge); W* = W when X = X_ref (dead inputs,
    whose columns of X are zero, count as such)."""
    rhs = weighted_cross.clone()
    rhs[:, dead] = weight[:, dead]
    rhs += lam * weight
    # float32 (float64 only if that fails): the extra ridge of the target keeps this system well conditioned.
    lower, info = torch.linalg.cholesky_ex(h_damped.float())
    if int(info) != 0:
        return torch.cholesky_solve(rhs.double().T, torch.linalg.cholesky(h_damped.double())).T.float()
    return torch.cholesky_solve(rhs.T, lower).T


def gptq_vq(
    weight: Tensor,
    hessian: Tensor,
    cfg: VQConfig,
    seed: int,
    cross: Tensor | None = None,
    weighted_cross: Tensor | None = None,
) -> VQParts:
    """Calibration-aware VQ of a float32 (out, in) weight with input Hessian (in, in).

    With ``cross`` = X_ref^T X / n (inputs of the original model vs. the partly compressed one),
    or directly ``weighted_cross`` = W C (out, in), the target is the original layer output instead
    of this layer's output on compressed inputs, so the layer also compensates the error of the
    layers before it.
    """
    if weighted_cross is None and cross is not None:
        weighted_cross = weight @ cross
    target, h = _target_and_hessian(weight, hessian, cfg, weighted_cross)
    scales = rms_scales(target[:, : weight.shape[1]], cfg.scale_granularity, cfg.scale_group_size)
    col_scale = column_scales(scales, target.shape[1], cfg.scale_group_size)
    if col_scale is None:
        col_scale = torch.ones_like(target)
    d = cfg.vector_dim
    ranges = group_vector_ranges(target.shape[1] // d, cfg)
    order, groups = vector_order(h, ranges, d, cfg.act_order)  # (n_vec,) storage index of each processed vector
    h_p, target_p, col_scale_p = h, target, col_scale
    if cfg.act_order:  # permuted copies only when the processing order is not the storage order
        cols = (order[:, None] * d + torch.arange(d, device=order.device)).reshape(-1)  # (in_p,)
        h_p, target_p, col_scale_p = h[cols][:, cols], target[:, cols], col_scale[:, cols]
    u = inverse_hessian_factor(h_p)  # the GPTQ metric in processing order
    state = _ColumnLoop.start(target_p, u, col_scale_p, order, cfg)
    starts = group_starts(ranges, groups)
    previous = None
    for vs, ve in block_bounds(state.n_vec, cfg.block_size // d, starts):
        if vs in starts:
            g = starts[vs]
            span = (vs, vs + ranges[g][1] - ranges[g][0])
            # The groups of one layer share a distribution (weights over their row scales): the previous
            # group's codebook is a better start than random rows, and needs fewer iterations (docs/llm.md).
            warm = previous if cfg.kmeans_warm_iters > 0 else None
            state.codebooks[g] = _fit_group_codebooks(state, span, cfg, derive_seed(seed, "codebook_group", g), warm)
            previous = g
        state.quantize_block(vs, ve, cfg.refine_passes)
    values, cb_scales = round_codebook(state.codebooks, cfg.codebook_dtype)
    codes = torch.empty_like(state.codes)
    codes[:, order] = state.codes  # back to storage order
    parts = VQParts(codes, values, cb_scales, scales)
    if cfg.finetune_steps > 0:
        parts = finetune(target, h, parts, cfg)
    return parts


def _target_and_hessian(weight: Tensor, hessian: Tensor, cfg: VQConfig, weighted_cross: Tensor | None):
    """(padded target weight (out, in_p), damped H (in_p, in_p))."""
    target = pad_columns(weight, cfg.vector_dim)
    in_p = target.shape[1]
    h, lam, dead = damped_hessian(pad_hessian(hessian, in_p), cfg.damping)
    if weighted_cross is not None:
        # A stronger ridge than GPTQ's damping: with few calibration tokens the regression would
        # otherwise fit noise in weakly-excited input directions.
        extra = cfg.target_damping * float(torch.diagonal(h).mean())
        h_target = h + extra * torch.eye(in_p, device=h.device)
        wc = pad_columns(weighted_cross, cfg.vector_dim)  # (out, in_p)
        target = regression_target(target, wc, h_target, lam + extra, dead)
    return target, h


def vector_order(h: Tensor, ranges: list[tuple[int, int]], d: int, act_order: bool) -> tuple[Tensor, list[int]]:
    """The order in which the GPTQ loop visits the vectors ((n_vec,) storage indices) and the codebook
    groups in that order: storage order, or with ``act_order`` GPTQ's act-order with static groups:
    groups by decreasing mean input energy (diag H), within each group its vectors by decreasing energy.
    Groups stay contiguous, so the storage format does not change; the salient vectors are quantized
    first, while the most later columns remain to absorb their error."""
    n_vec = h.shape[0] // d
    if not act_order:
        return torch.arange(n_vec, device=h.device), list(range(len(ranges)))
    energy = torch.diagonal(h).reshape(n_vec, d).sum(1)  # (n_vec,)
    mean_energy = [float(energy[s:e].mean()) for s, e in ranges]
    groups = sorted(range(len(ranges)), key=lambda g: -mean_energy[g])
    order = [s + torch.argsort(energy[s:e], descending=True, stable=True) for s, e in (ranges[g] for g in groups)]
    return torch.cat(order), groups


def group_starts(ranges: list[tuple[int, int]], groups: list[int]) -> dict[int, int]:
    """{position in processing order where a codebook group starts: that group}."""
    starts, position = {}, 0
    for g in groups:
        starts[position] = g
        position += ranges[g][1] - ranges[g][0]
    return starts


def metric_transforms(u: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Per vector j: U_jj^-1 (the d x d diagonal block of U, inverted; (n_vec, d, d)) and the mean of
    1 / U_ii^2 over its columns ((n_vec,): how much an error there costs, GPTQ's weighting)."""
    n_vec = u.shape[0] // d
    u_blocks = torch.diagonal(u.reshape(n_vec, d, n_vec, d), dim1=0, dim2=2).permute(2, 0, 1)  # (n_vec, d, d)
    eye = torch.eye(d, device=u.device).expand(n_vec, d, d)
    transforms = torch.linalg.solve_triangular(u_blocks, eye, upper=True)
    importance = (1.0 / torch.diagonal(u) ** 2).reshape(n_vec, d).mean(1)
    return transforms, importance


def block_bounds(n_vec: int, block_vectors: int, group_starts) -> list[tuple[int, int]]:
    """[start, end) vector ranges of the lazy-update blocks; every codebook group starts a block."""
    starts = sorted(set(range(0, n_vec, max(1, block_vectors))) | set(group_starts))
    return list(zip(starts, starts[1:] + [n_vec]))


def _fit_group_codebooks(
    state: "_ColumnLoop", vec_range: tuple[int, int], cfg: VQConfig, seed: int, previous: int | None
) -> Tensor:
    """Hessian-weighted k-means of one codebook group's current (error-corrected) weight vectors,
    warm-started from group ``previous``'s codebooks when given."""
    gs, ge = vec_range
    d = cfg.vector_dim
    vecs = (state.w[:, gs * d : ge * d] / state.col_scale[:, gs * d : ge * d]).reshape(-1, d)  # (out * n, d)
    vw = (state.vec_scale[:, gs:ge] ** 2 * state.importance[None, gs:ge]).reshape(-1)  # (out * n,)
    return fit_group(vecs, vw, cfg, seed, init=None if previous is None else state.codebooks[previous])[0]


@dataclass
class _ColumnLoop:
    """The GPTQ column loop over vectors of d columns: the weight being corrected, the metric, and the
    codebooks and codes chosen so far."""

    w: Tensor  # (out, in_p) target in processing order, error-corrected as columns are quantized
    u: Tensor  # (in_p, in_p)
    col_scale: Tensor  # (out, in_p)
    vec_scale: Tensor  # (out, n_vec)
    transforms: Tensor  # (n_vec, d, d)
    importance: Tensor  # (n_vec,)
    group_of_vec: Tensor  # (n_vec,) codebook group of each processed vector
    codebooks: Tensor  # (G, M, K, d)
    codes: Tensor  # (out, n_vec, M) in processing order

    @classmethod
    def start(cls, target: Tensor, u: Tensor, col_scale: Tensor, order: Tensor, cfg: VQConfig) -> "_ColumnLoop":
        """``target``, ``u`` and ``col_scale`` are in processing order; ``order`` (n_vec,) maps each
        processed vector to its storage index (for its codebook group)."""
        d, m = cfg.vector_dim, cfg.num_codebooks
        out_features, in_p = target.shape
        n_vec = in_p // d
        transforms, importance = metric_transforms(u, d)
        n_groups = len(group_vector_ranges(n_vec, cfg))
        return cls(
            w=target.clone(),
            u=u,
            col_scale=col_scale,
            vec_scale=col_scale[:, ::d],
            transforms=transforms,
            importance=importance,
            group_of_vec=vector_group_index(n_vec, d, cfg.group_size, device=order.device)[order],
            codebooks=torch.empty(n_groups, m, cfg.codebook_size, d, device=target.device),
            codes=torch.empty(out_features, n_vec, m, dtype=torch.long, device=target.device),
        )

    @property
    def n_vec(self) -> int:
        return self.codes.shape[1]

    def quantize_block(self, vs: int, ve: int, refine_passes: int) -> None:
        """Vectors vs..ve: choose codes under the metric U_jj^-1, spread each error over the later
        columns of the block at once, and over the columns after the block lazily (one GEMM)."""
        d = self.codebooks.shape[-1]
        cs, ce = vs * d, ve * d
        block = self.w[:, cs:ce].clone()  # (out, (ve - vs) * d)
        u_block = self.u[cs:ce, cs:ce]
        if compiled_loop_applies(block, self.codebooks):
            cb = self.codebooks[self.group_of_vec[vs:ve], 0]  # (nb, K, d)
            s = self.vec_scale[:, vs:ve]  # (out, nb)
            errors, self.codes[:, vs:ve, 0] = quantize_block_compiled(block, s, self.transforms[vs:ve], cb, u_block)
            self.w[:, ce:] -= errors @ self.u[cs:ce, ce:]
            return
        errors = torch.zeros_like(block)
        for j in range(vs, ve):
            lc = (j - vs) * d
            cb = self.codebooks[self.group_of_vec[j]]  # (M, K, d)
            t = self.transforms[j]  # (d, d)
            s = self.vec_scale[:, j : j + 1]  # (out, 1)
            c = assign_additive((block[:, lc : lc + d] / s) @ t, cb @ t, refine_passes)  # (out, M)
            q = cb[0][c[:, 0]]
            for i in range(1, cb.shape[0]):
                q = q + cb[i][c[:, i]]
            err = (block[:, lc : lc + d] - s * q) @ t  # (out, d)
            block[:, lc + d :] -= err @ u_block[lc : lc + d, lc + d :]
            errors[:, lc : lc + d] = err
            self.codes[:, j] = c
        self.w[:, ce:] -= errors @ self.u[cs:ce, ce:]


class _AdditiveDecoder:
    """The linear map (flat codebooks (G*M*K, d), per-vector scales) -> padded weight, and its adjoint."""

    def __init__(self, codes: Tensor, codebook_shape: tuple[int, ...], cfg: VQConfig):
        g, m, k, d = codebook_shape
        out_features, n_vec, _ = codes.shape
        index = flat_code_index(codes, codebook_shape, d, cfg.group_size)  # (out, n_vec, M)
        self.flat_index = [index[..., i].reshape(-1) for i in range(m)]
        self.shape = (out_features, n_vec, d)
        self.num_entries = g * m * k
        # The adjoint sums every vector's gradient into its codebook entry: a fixed sparse (entries x vectors)
        # 0/1 matrix, so a CSR product (8x faster than index_add_ for a 576 x 1536 layer on 2 cores).
        self.gather_t = [_selection_matrix(idx, self.num_entries) for idx in self.flat_index]

    def decode(self, flat_codebooks: Tensor, vec_scale: Tensor | None) -> Tensor:
        out = flat_codebooks[self.flat_index[0]]
        for idx in self.flat_index[1:]:
            out = out + flat_codebooks[idx]
        out = out.reshape(self.shape)
        if vec_scale is not None:
            out = out * vec_scale[..., None]
        return out.reshape(self.shape[0], -1)

    def adjoint(self, grad: Tensor, vec_scale: Tensor | None) -> Tensor:
        g = grad.reshape(self.shape)
        if vec_scale is not None:
            g = g * vec_scale[..., None]
        g = g.reshape(-1, self.shape[2])  # (out * n_vec, d)
        out = self.gather_t[0] @ g
        for a in self.gather_t[1:]:
            out = out + a @ g
        return out  # (entries, d)


def _selection_matrix(index: Tensor, num_entries: int) -> Tensor:
    """CSR (num_entries, n) with a 1 at (index[j], j)."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=num_entries)
    crow = torch.zeros(num_entries + 1, dtype=torch.int64, device=index.device)
    crow[1:] = torch.cumsum(counts, 0)
    ones = torch.ones(index.numel(), device=index.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, order, ones, (num_entries, index.numel()))


def output_error(q: Tensor, target: Tensor, hessian: Tensor) -> float:
    e = q - target
    return float(((e @ hessian) * e).sum())


def _solve_codebooks(dec: _AdditiveDecoder, flat: Tensor, vec_scale, target, h, steps: int) -> Tensor:
    """Jacobi-preconditioned CG on the normal equations of min_C tr((A C - W) H (A C - W)^T)."""
    flat = flat.clone()
    r = dec.adjoint((target - dec.decode(flat, vec_scale)) @ h, vec_scale)
    sq = torch.ones(dec.shape[:2], device=flat.device) if vec_scale is None else vec_scale**2
    diag_h = torch.diagonal(h).reshape(1, dec.shape[1], dec.shape[2])
    precond = dec.adjoint((sq[..., None] * diag_h).reshape(dec.shape[0], -1), None)
    precond = torch.where(precond > 0, precond, torch.ones_like(precond))
    z = r / precond
    p = z.clone()
    rz = (r * z).sum()
    rz_start = float(rz)
    for _ in range(steps):
        if not float(rz) > 1e-8 * rz_start:  # converged (Jacobi PCG usually needs only a few steps)
            break
        ap = dec.adjoint(dec.decode(p, vec_scale) @ h, vec_scale)
        pap = (p * ap).sum()
        if not pap > 0:
            break
        alpha = rz / pap
        flat += alpha * p
        r -= alpha * ap
        z = r / precond
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return flat


def _solve_scales(decoded: Tensor, target: Tensor, h: Tensor, old: Tensor, scale_group_size: int) -> Tensor:
    """Exact least-squares scales (out, S) for an unscaled decoded weight (out, in_p)."""
    if old.shape[1] == 1:
        dh = decoded @ h
        num, den = (dh * target).sum(1), (dh * decoded).sum(1)
        new = (num / den)[:, None]
    else:
        out_features, in_p = decoded.shape
        n_groups = old.shape[1]
        col_group = torch.arange(in_p, device=decoded.device) // scale_group_size
        a = torch.zeros(out_features, n_groups, n_groups, device=decoded.device)
        b = torch.zeros(out_features, n_groups, device=decoded.device)
        for g in range(n_groups):
            cols = slice(g * scale_group_size, min(in_p, (g + 1) * scale_group_size))
            y = decoded[:, cols] @ h[cols, :]  # contribution of group g's columns
            a[:, :, g] = torch.zeros(out_features, n_groups, device=decoded.device).index_add_(
                1, col_group, decoded * y
            )
            b[:, g] = (y * target).sum(1)
        ridge = 1e-6 * torch.diagonal(a, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        a = a + ridge[:, None, None] * torch.eye(n_groups, device=a.device)
        new = torch.linalg.solve(a, b[..., None])[..., 0]
    ok = torch.isfinite(new) & (new.abs() < 65000)
    return torch.where(ok, new, old)


def finetune(target: Tensor, h: Tensor, parts: VQParts, cfg: VQConfig, rounds: int = 2) -> VQParts:
    """Alternate codebook CG and exact scale solves with codes fixed; keep the result only if better."""
    d = cfg.vector_dim
    in_p = target.shape[1]
    shape = tuple(parts.codebooks.shape)
    dec = _AdditiveDecoder(parts.codes, shape, cfg)
    scales = parts.scales

    def vec_scale_of(s):
        cs = column_scales(s, in_p, cfg.scale_group_size)
        return None if cs is None else cs[:, ::d]

    before = output_error(dec.decode(parts.codebooks.reshape(-1, d), vec_scale_of(scales)), target, h)
    flat, codes = parts.codebooks.reshape(-1, d), parts.codes
    steps = [cfg.finetune_steps // rounds + (1 if r < cfg.finetune_steps % rounds else 0) for r in range(rounds)]
    for n in steps:
        flat = _solve_codebooks(dec, flat, vec_scale_of(scales), target, h, n)
        if scales is not None:
            scales = _solve_scales(dec.decode(flat, None), target, h, scales, cfg.scale_group_size)
        for _ in range(cfg.code_sweeps):  # the codes the moved codebooks now call for
            vec_scale = vec_scale_of(scales)
            residual = dec.decode(flat, vec_scale) - target
            codes = sweep_codes(codes, flat.reshape(shape), vec_scale, residual, h, cfg)
            dec = _AdditiveDecoder(codes, shape, cfg)
    values, cb_scales = round_codebook(flat.reshape(shape), cfg.codebook_dtype)
    if scales is not None:
        scales = _solve_scales(dec.decode(values.reshape(-1, d), None), target, h, scales, cfg.scale_group_size)
        scales = scales.to(torch.float16).float()
    after = output_error(dec.decode(values.reshape(-1, d), vec_scale_of(scales)), target, h)
    if after < before:
        return VQParts(codes, values, cb_scales, scales)
    return parts
