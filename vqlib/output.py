"""The value every quantizer returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from torch import Tensor


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Unpacks as the 3-tuple ``(quantized, indices, loss)`` so that
    ``q, idx, loss = vq(x)`` works; ``metrics`` holds detached diagnostics
    (perplexity, fraction of codes used, dead codes, ...).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.quantized, self.indices, self.loss))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> Tensor:
        return (self.quantized, self.indices, self.loss)[i]
