"""Reuse a block's compressed-layer outputs across the calibration passes over the same batch.

Calibrating one block runs it once per layer group (statistics for that group) and once more to
produce the next block's inputs. Every pass re-runs the layers compressed in earlier groups, and
for all but the most recent group their inputs are exactly those of the previous pass: nothing
upstream of them changed. With q/k/v, o, gate/up, down in a Llama block that is 38 linear-layer
units of work per batch where 21 are new (docs/llm.md, "Compression time").

The memo keeps, per compressed layer, batch and call, the input it saw and the output it gave,
and returns that output when the new input is bit-identical (``torch.equal``). Anything else
recomputes: a changed input, a tensor modified in place since (``Tensor._version``), extra
arguments, autograd, or a full memory budget. It never changes a result, only skips work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Memory for the kept inputs and outputs of one block (~330 MB for SmolLM2-135M and 8,192 tokens).
MEMO_BUDGET_BYTES = 1 << 30


@dataclass
class _Entry:
    x: Tensor
    x_version: int
    y: Tensor
    y_version: int

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + self.y.numel() * self.y.element_size()

    def matches(self, x: Tensor) -> bool:
        """The same input as before, and neither tensor modified in place since."""
        return (
            self.x._version == self.x_version
            and self.y._version == self.y_version
            and self.x.shape == x.shape
            and self.x.dtype == x.dtype
            and self.x.device == x.device
            and torch.equal(self.x, x)
        )


class OutputMemo:
    """Watches compressed layers (``watch``) during passes run through ``run(batch_index, fn)``."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = MEMO_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self.entries: dict[tuple[int, int, int], _Entry] = {}  # (layer, batch, call) -> entry
        self.watched: list[nn.Module] = []
        self.batch: int | None = None
        self.calls: dict[int, int] = {}

    def run(self, batch: int, fn: Callable[[], Any]) -> Any:
        """Run one pass over batch ``batch`` (outside ``run`` the watched layers just compute)."""
        self.batch, self.calls = batch, {}
        try:
            return fn()
        finally:
            self.batch = None

    def watch(self, layer: nn.Module) -> None:
        """From now on, ``layer``'s outputs are kept and reused; its weights must not change until ``close``."""
        compute = layer.forward

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            if self.batch is None or args or kwargs or torch.is_grad_enabled():
                return compute(x, *args, **kwargs)
            return self._lookup(id(layer), x, compute)

        layer.forward = forward  # an instance attribute: the class's forward is untouched
        self.watched.append(layer)

    def _lookup(self, layer_id: int, x: Tensor, compute: Callable[[Tensor], Tensor]) -> Tensor:
        call = self.calls[layer_id] = self.calls.get(layer_id, 0) + 1
        key = (layer_id, self.batch, call)
        entry = self.entries.get(key)
        if entry is not None and entry.matches(x):
            self.hits += 1
            return entry.y
        self.misses += 1
        y = compute(x)
        if entry is not None:
            self.used -= entry.nbytes
            del self.entries[key]
        new = _Entry(x, x._version, y, y._version)
        if self.used + new.nbytes <= self.budget:
            self.entries[key] = new
            self.used += new.nbytes
        return y

    def close(self) -> None:
        """Forget every kept tensor and give the watched layers their own forward back."""
        for layer in self.watched:
            layer.__dict__.pop("forward", None)
        self.watched.clear()
        self.entries.clear()
        self.used = 0
