"""What ``compress`` did to every linear layer, with honest sizes, and the table the CLI prints."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    status: str  # "compressed" | "skipped"
    reason: str = ""  # why a layer was skipped (or padded)
    method: str = ""
    bits_per_weight: float | None = None  # codes + codebooks + scales, / weight count
    relative_error: float | None = None
    error_kind: str = ""  # "output": ||(W-Q) X^T|| / ||W X^T|| on calibration inputs; "weight": ||W-Q|| / ||W||
    seconds: float = 0.0
    storage_bytes: int = 0  # bytes encoding the weight after compression (bias excluded)
    original_bytes: int = 0  # bytes of the original weight
    format: str = ""  # e.g. "d4 1x8 g128" (VQ: vector dim, codebooks x bits, group) or "int3 g128" (scalar)

    @property
    def num_weights(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    seconds: float = 0.0
    allocation: str = ""  # with a bit budget: how the layers' errors were weighted (allocation.Allocation)

    @property
    def compressed(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "compressed"]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight over all compressed layers together (storage bits / weights)."""
        weights = sum(r.num_weights for r in self.compressed)
        return 8.0 * sum(r.storage_bytes for r in self.compressed) / weights if weights else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "config": self.config,
            "bits_per_weight": self.bits_per_weight,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "seconds": self.seconds,
            "allocation": self.allocation,
        }

    def table(self) -> str:
        rows = [("layer", "shape", "status", "format", "bits/w", "rel. error", "time s", "note")]
        for r in self.layers:
            err = "" if r.relative_error is None else f"{r.relative_error:.4f} ({r.error_kind})"
            bpw = "" if r.bits_per_weight is None else f"{r.bits_per_weight:.3f}"
            rows.append(
                (r.name, f"{r.shape[0]}x{r.shape[1]}", r.status, r.format, bpw, err, f"{r.seconds:.2f}", r.reason)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_comp, n_skip = len(self.compressed), len(self.skipped)
        orig = sum(r.original_bytes for r in self.compressed)
        new = sum(r.storage_bytes for r in self.compressed)
        lines.append("")
        lines.append(
            f"compressed {n_comp} layer(s), skipped {n_skip}; compressed layers: {self.bits_per_weight:.3f} bits/weight"
            + (
                f" (budget {target}; {self.allocation})"
                if (target := self.config.get("target_bits_per_weight")) is not None
                else ""
            )
            + ", "
            f"{orig / 2**20:.2f} MiB -> {new / 2**20:.2f} MiB"
        )
        lines.append(
            f"whole model: {self.model_bytes_before / 2**20:.2f} MiB -> {self.model_bytes_after / 2**20:.2f} MiB; "
            f"{self.seconds:.1f} s"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer storage of ``model``."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


class ProgressBar:
    """A plain-text per-layer progress bar on stderr (no extra dependency)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr

    def __call__(self, layer: LayerReport) -> None:
        self.done += 1
        filled = int(self.width * self.done / max(1, self.total))
        bar = "#" * filled + "-" * (self.width - filled)
        if layer.status == "compressed":
            info = f"{layer.bits_per_weight:.2f} b/w, err {layer.relative_error:.4f}, {layer.seconds:.2f}s"
        else:
            info = f"skipped: {layer.reason}"
        print(f"[{bar}] {self.done}/{self.total} {layer.name} ({info})", file=self.stream, flush=True)


def layer_format(layer: nn.Module) -> str:
    """Short name of a compressed layer's format: "d4 1x8 g128" (VQLinear) or "int3 g128" (ScalarLinear)."""
    if hasattr(layer, "num_codebooks"):
        return f"d{layer.vector_dim} {layer.num_codebooks}x{layer.codebook_bits} g{layer.group_size}"
    return f"int{layer.bits} g{layer.group_size}"


def weight_bytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()
