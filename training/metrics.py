"""Validation metrics that need no downloaded weights: PSNR, SSIM and codebook usage over a whole set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqlib.base import perplexity as code_perplexity
from vqlib.core.distributed import all_gather_rows


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB, shape (batch,); identical images give +inf."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004), shape (batch,): Gaussian window 11 / sigma 1.5, channels averaged,
    statistics over the valid region (matches ``skimage.metrics.structural_similarity(gaussian_weights=True,
    use_sample_covariance=False)``)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"ssim: expected two (b, c, h, w) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images must be at least {window_size}x{window_size}, got {tuple(a.shape[-2:])}")
    a, b = a.float(), b.float()
    c = a.shape[1]
    g = _gaussian_window(window_size, sigma, a.device)
    kernel_h = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kernel_w = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


class CodebookUsageTracker:
    """Counts of every code seen across many batches, per quantizer level / head (the trailing index axis),
    without per-code memory: only the distinct codes seen are stored. ``compute()`` gathers over DDP ranks."""

    def __init__(self, codebook_size: int, levels: int = 1):
        self.codebook_size, self.levels = codebook_size, levels
        self.reset()

    def reset(self) -> None:
        self.codes: list[Tensor | None] = [None] * self.levels
        self.counts: list[Tensor | None] = [None] * self.levels
        self.tokens = 0

    @torch.no_grad()
    def update(self, indices: Tensor, has_level_axis: bool) -> None:
        """``indices``: (..., levels) when ``has_level_axis`` else (...); negative entries (dropped levels) are ignored."""
        idx = indices.detach().reshape(-1, self.levels) if has_level_axis else indices.detach().reshape(-1, 1)
        if idx.shape[1] != self.levels:
            raise ValueError(f"expected {self.levels} levels, got indices of shape {tuple(indices.shape)}")
        self.tokens += idx.shape[0]
        for level in range(self.levels):
            self._merge(level, idx[:, level])

    def _merge(self, level: int, new: Tensor, new_counts: Tensor | None = None) -> None:
        new_counts = torch.ones_like(new) if new_counts is None else new_counts
        keep = new >= 0
        new, new_counts = new[keep], new_counts[keep]
        old, old_counts = self.codes[level], self.counts[level]
        if old is not None:
            new, new_counts = torch.cat([old, new.to(old.device)]), torch.cat([old_counts, new_counts.to(old.device)])
        codes, inverse = torch.unique(new, return_inverse=True)
        self.codes[level] = codes
        self.counts[level] = torch.zeros_like(codes).scatter_add_(0, inverse, new_counts)

    @torch.no_grad()
    def compute(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """{"usage": (levels,) fraction of codes used at least once, "perplexity": (levels,)} over all ranks."""
        usage, perplexity = [], []
        for level in range(self.levels):
            codes = self.codes[level]
            counts = self.counts[level]
            if codes is None:
                codes = torch.zeros(0, dtype=torch.long, device=device)
                counts = torch.zeros(0, dtype=torch.long, device=device)
            pairs = all_gather_rows(torch.stack([codes, counts], dim=1).to(device or codes.device))
            merged = CodebookUsageTracker(self.codebook_size)
            merged._merge(0, pairs[:, 0], pairs[:, 1])
            c = merged.counts[0]
            assert c is not None
            usage.append(c.numel() / self.codebook_size)
            perplexity.append(float(code_perplexity(c, torch.float64)) if c.numel() else 0.0)
        return {"usage": torch.tensor(usage), "perplexity": torch.tensor(perplexity)}
