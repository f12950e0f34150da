"""Helpers shared by the image and audio training modules: uncounted optimizer steps, the log folder and
optimizer parameter groups with weight decay on matrices only."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from lightning.pytorch import LightningModule
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn


def step_without_counting(optimizer: Any) -> None:
    """``optimizer.step()`` through Lightning (precision / strategy hooks) without advancing ``global_step``.

    Lightning counts every step of a LightningOptimizer under manual optimisation; the discriminators' steps
    are left out so that ``global_step`` / ``max_steps`` / ``disc_start_step`` count batches (generator steps).
    A plain torch optimizer (no Lightning wrapper) just steps."""
    if not isinstance(optimizer, LightningOptimizer):
        optimizer.step()
        return
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


def log_folder(module: LightningModule) -> Path:
    """Where a module writes its files: the logger's log_dir (beside the metrics), else the trainer's root."""
    logger = module.logger
    # Not every Lightning logger has a log_dir (e.g. remote ones): those fall back to the trainer's root.
    log_dir = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(log_dir or module.trainer.default_root_dir)


def weight_decay_groups(params: Iterable[nn.Parameter], weight_decay: float, **options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups with ``weight_decay`` on parameters of 2+ dimensions (weight matrices, conv
    kernels, codebooks) and none on 1-D ones (biases, norm gains), whose decay only shrinks offsets and scales.

    ``options`` (lr, lr_mult, ...) go into every group; empty groups are left out. With ``weight_decay == 0``
    the parameters stay in one group (the optimizer state of earlier checkpoints keeps its layout)."""
    params = list(params)
    if weight_decay == 0:
        groups = [{"params": params, "weight_decay": 0.0, **options}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **options},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **options},
        ]
    return [group for group in groups if group["params"]]


__all__ = ["log_folder", "step_without_counting", "weight_decay_groups"]
