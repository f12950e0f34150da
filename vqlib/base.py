"""Base class shared by all quantizers: common metrics and a JSON config for rebuilding."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .output import QuantizerOutput


class Quantizer(nn.Module):
    """A module mapping features to discrete codes and back (the interface tokenizers rely on).

    Subclasses implement ``forward(x, mask=None) -> QuantizerOutput`` and ``decode(indices) -> Tensor``,
    set ``dim`` and ``codebook_size`` (codes per codebook), and call ``self.save_config(locals())`` first
    thing in ``__init__`` so that :func:`quantizer_from_config` can rebuild them (tokenizers' from_pretrained).

    Layout facts, read by tokenizers instead of probing for attributes:
        channel_first: inputs are (b, dim, *spatial) and decode returns that layout; else (..., dim).
        num_codes_per_token: indices per token (heads of a multi-head VQ, levels of a residual VQ).
        code_axis: indices end with an axis of ``num_codes_per_token`` entries (else shape = token shape).
    """

    dim: int
    codebook_size: int
    config: dict[str, Any]
    channel_first: bool = False
    num_codes_per_token: int = 1
    code_axis: bool = False

    def save_config(self, init_locals: dict[str, Any]) -> None:
        """Record the constructor's arguments as JSON-able ``init_args``: tensors as ``<name>_shape`` (their values
        travel in the state dict), tuples as lists, a dataclass argument and ``**kwargs`` as flat entries."""
        cfg: dict[str, Any] = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or name not in init_locals:
                continue
            value = init_locals[name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                cfg.update(value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                cfg.update(dataclasses.asdict(value))
            elif isinstance(value, Tensor):
                cfg[f"{name}_shape"] = list(value.shape)
            else:
                cfg[name] = list(value) if isinstance(value, tuple) else value
        self.config = cfg

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: Tensor, mask: Tensor | None = None, **forward_kwargs: Any) -> Tensor:
        """Integer indices of ``x``; never updates state (no EMA, k-means init, dead-code restart, usage counters
        or step counts): the forward runs in eval mode, and every submodule's mode is restored afterwards.
        ``decode(encode(x))`` equals ``forward(x).quantized`` in eval mode."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            return self(x, mask, **forward_kwargs).indices
        finally:
            for module, mode in modes:
                module.training = mode

    # Latents of convolutional tokenizers are (b, dim, *spatial) whatever layout the quantizer itself takes.
    def forward_channel_first(self, z: Tensor, mask: Tensor | None = None, **forward_kwargs: Any) -> QuantizerOutput:
        """``forward`` on (b, dim, *spatial) latents; ``quantized`` comes back (b, dim, *spatial)."""
        if self.channel_first:
            return self(z, mask, **forward_kwargs)
        out = self(rearrange(z, "b d ... -> b ... d"), mask, **forward_kwargs)
        out.quantized = rearrange(out.quantized, "b ... d -> b d ...")
        return out

    def decode_channel_first(self, indices: Tensor) -> Tensor:
        """``decode`` to (b, dim, *spatial), the layout :meth:`forward_channel_first` returns."""
        q = self.decode(indices)
        return q if self.channel_first else rearrange(q, "b ... d -> b d ...")


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


def perplexity(counts: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """exp(entropy) of the code distribution with these per-code ``counts`` (codes never seen may be left
    out: they add nothing), computed in ``dtype``. Shared by the per-batch metrics and the validation tracker."""
    p = counts.to(dtype) / counts.sum()
    return (-(p * p.log()).sum()).exp()


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
    return {
        "perplexity": perplexity(counts),
        "batch_usage": torch.tensor(counts.numel() / codebook_size, device=indices.device),
    }
