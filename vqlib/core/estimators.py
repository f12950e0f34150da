"""Gradient estimators through the non-differentiable code choice.

Both return a tensor whose *value* is exactly ``q`` (bit for bit: ``x - x.detach()`` is exactly zero),
so ``decode(indices)`` reproduces a quantizer's output exactly, while gradients follow the estimator.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Value q, gradient identity w.r.t. x (van den Oord et al. 2017)."""
    return q.detach() + (x - x.detach())


def rotation_trick(x: Tensor, q: Tensor) -> Tensor:
    """Value q, gradient through the rotation + rescaling that maps x onto q (Fifty et al. 2024).

    With u = x/|x|, v = q/|q| and w = (u+v)/|u+v|, R = I - 2ww^T + 2vu^T maps u to v; the output is
    (|q|/|x|) R x with R and the scale treated as constants. x, q: (n, d).
    """
    eps = 1e-6
    x_norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (x / x_norm).detach()
    v = (q / q_norm).detach()
    w = F.normalize(u + v, dim=-1).detach()
    rotated = x - 2 * (x * w).sum(-1, keepdim=True) * w + 2 * (x * u).sum(-1, keepdim=True) * v
    rotated = rotated * (q_norm / x_norm).detach()
    return q.detach() + (rotated - rotated.detach())
