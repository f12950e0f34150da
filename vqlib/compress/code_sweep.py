"""Re-choose codes with the codebooks fixed: exact coordinate descent on the layer objective.

The GPTQ column loop picks each vector's code once, against codebooks fit before the later columns were
error-corrected, and the codebook fine-tune then moves the codebooks under those codes. A sweep over the
vectors re-chooses every code for the codebooks it now has, minimising the exact objective
tr((Q - T) H (Q - T)^T) one vector at a time with all other codes fixed (AQLM's code update, done
exactly rather than with a beam; PV-tuning's discrete step applied to the layer problem). Each change
lowers the objective or keeps it, so the sweep can only help.

For vector j of a row with scale s, current entry o and gradient g = ((Q - T) H)_j, moving to entry a
changes the objective by 2 s (a - o)^T g + s^2 (a - o)^T H_jj (a - o); up to a constant in a that is
2 s a^T (g - s H_jj o) + s^2 a^T H_jj a, evaluated for all K entries at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import VQConfig
from .format import vector_group_index


def sweep_codes(
    codes: Tensor, codebooks: Tensor, vec_scale: Tensor | None, residual: Tensor, h: Tensor, cfg: VQConfig
) -> Tensor:
    """One pass over all vectors (GPTQ's lazy blocks of ``cfg.block_size`` columns); returns new codes.

    codes (out, n_vec, M) int64 in storage order; codebooks (G, M, K, d) float; vec_scale (out, n_vec)
    or None; residual = Q - T (out, in_p) for the current codes; h the damped Hessian (in_p, in_p)."""
    out_features, n_vec, m = codes.shape
    d = codebooks.shape[-1]
    codes = codes.clone()
    scale = torch.ones(out_features, n_vec, device=codes.device) if vec_scale is None else vec_scale
    group_of_vec = vector_group_index(n_vec, d, cfg.group_size, device=codes.device)  # (n_vec,)
    grad = residual @ h  # (out, in_p): the objective's gradient / 2, kept current for the columns still to visit
    block_vectors = max(1, cfg.block_size // d)
    for vs in range(0, n_vec, block_vectors):
        ve = min(n_vec, vs + block_vectors)
        cs, ce = vs * d, ve * d
        changes = torch.zeros(out_features, ce - cs, device=codes.device)  # (out, block cols): Q_new - Q_old
        block_grad = grad[:, cs:ce].clone()
        h_block = h[cs:ce, cs:ce]
        for j in range(vs, ve):
            lc = (j - vs) * d
            h_jj = h_block[lc : lc + d, lc : lc + d]  # (d, d)
            s = scale[:, j : j + 1]  # (out, 1)
            for i in range(m):
                book = codebooks[group_of_vec[j], i]  # (K, d)
                old = book[codes[:, j, i]]  # (out, d)
                g = block_grad[:, lc : lc + d] - s * (old @ h_jj)  # (out, d)
                cost = 2 * s * (g @ book.T) + s**2 * ((book @ h_jj) * book).sum(-1)[None]  # (out, K)
                new = cost.argmin(1)
                # Keep the old code where it is as good (ties, rounding): a sweep never moves sideways.
                keep = cost.gather(1, new[:, None])[:, 0] >= cost.gather(1, codes[:, j, i : i + 1])[:, 0]
                new = torch.where(keep, codes[:, j, i], new)
                delta = s * (book[new] - old)  # (out, d)
                codes[:, j, i] = new
                changes[:, lc : lc + d] += delta
                block_grad += delta @ h_block[lc : lc + d]
        grad[:, ce:] += changes @ h[cs:ce, ce:]
    return codes
