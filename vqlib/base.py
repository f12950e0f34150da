"""Base class shared by all quantizers: common metrics and a JSON config for rebuilding."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from .output import QuantizerOutput


class Quantizer(nn.Module):
    """A module mapping features to discrete codes and back.

    Subclasses implement ``forward(x, mask=None) -> QuantizerOutput`` and
    ``decode(indices) -> Tensor``, expose ``codebook_size`` and ``dim``, and call
    ``self.save_config(locals())`` first thing in ``__init__`` so that
    :func:`quantizer_from_config` can rebuild them (used by tokenizers' from_pretrained).
    """

    dim: int
    codebook_size: int
    config: dict[str, Any]

    def save_config(self, init_locals: dict[str, Any]) -> None:
        params = inspect.signature(type(self).__init__).parameters
        cfg = {}
        for name in params:
            if name == "self" or name not in init_locals:
                continue
            value = init_locals[name]
            if isinstance(value, Tensor):
                # Tensors (e.g. a frozen codebook) travel in the state dict; the config records their shape.
                cfg[f"{name}_shape"] = list(value.shape)
                continue
            if isinstance(value, tuple):
                value = list(value)
            cfg[name] = value
        self.config = cfg

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def quantizer_to_config(q: Quantizer) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}``: the same shape jsonargparse / LightningCLI use."""
    cls = type(q)
    module = cls.__module__
    if module.startswith("vqlib."):
        module = "vqlib"  # public path
    return {"class_path": f"{module}.{cls.__qualname__}", "init_args": dict(q.config)}


def quantizer_from_config(cfg: dict[str, Any]) -> Quantizer:
    """Rebuild a quantizer from :func:`quantizer_to_config`'s output (weights are loaded separately)."""
    path = cfg["class_path"]
    module_name, _, cls_name = path.rpartition(".")
    if not module_name.startswith("vqlib"):
        raise ValueError(f"quantizer class_path must be inside vqlib, got {path!r}")
    cls = getattr(importlib.import_module(module_name), cls_name)
    args = dict(cfg.get("init_args", {}))
    for key in [k for k in args if k.endswith("_shape")]:
        name = key[: -len("_shape")]
        # Placeholder tensor of the recorded shape; its values come from the state dict.
        args[name] = torch.zeros(args.pop(key))
    return cls(**args)


@torch.no_grad()
def usage_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Perplexity and fraction of codes used in this batch, never allocating per-code memory
    beyond the distinct codes seen (FSQ/LFQ codebooks can be 2^18+ codes)."""
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    if flat.numel() == 0:
        zero = torch.zeros((), device=indices.device)
        return {"perplexity": zero, "batch_usage": zero}
    _, counts = torch.unique(flat, return_counts=True)
    p = counts.float() / counts.sum()
    entropy = -(p * p.log()).sum()
    return {
        "perplexity": entropy.exp(),
        "batch_usage": torch.tensor(counts.numel() / codebook_size, device=indices.device),
    }
