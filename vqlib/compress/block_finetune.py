"""Fine-tune a compressed block's codebooks and scales against the original block's output (AQLM style).

Layer-wise calibration fits each layer to its own output; the errors of a block's layers still add
up through attention and the MLP's non-linearity. With the codes fixed, the codebook values and the
row scales are continuous, so a few Adam steps on ||block(X) - Y_ref||^2 (X: the block's inputs in
the partly compressed model, Y_ref: the original block's outputs on the original inputs) lower the
error the next blocks see. The result is rounded to the stored dtypes (int8 codebooks with their
fp16 scale, fp16 row scales) and kept only if the rounded block is better on the calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codebooks import round_codebook
from .format import VQLinear, decode_weight, unpack_codes

# Adam step size: codebook entries are O(1) (weights divided by their row RMS) and the scales are
# trained as multipliers around 1, so one step size fits both.
_LEARNING_RATE = 1e-3


class TrainableVQ(nn.Module):
    """A VQLinear with float codebook values and scale multipliers as parameters (codes fixed)."""

    def __init__(self, layer: VQLinear):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: only the new tensors train
        self.codes = unpack_codes(layer.codes)
        self.codebook = nn.Parameter(layer.codebook_values().clone())  # (G, M, K, d)
        self.base_scales = None if layer.scales is None else layer.scales.float()
        self.scale_mult = None if layer.scales is None else nn.Parameter(torch.ones_like(self.base_scales))  # (out, S)

    def scales(self) -> Tensor | None:
        return None if self.base_scales is None else self.base_scales * self.scale_mult

    def weight(self) -> Tensor:
        lay = self.layer
        w = decode_weight(
            self.codes,
            self.codebook,
            self.scales(),
            vector_dim=lay.vector_dim,
            group_size=lay.group_size,
            scale_group_size=lay.scale_group_size,
        )
        return w[:, : lay.in_features]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.layer.bias is None else self.layer.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def store(self) -> None:
        """Round the trained values to the storage dtypes and write them into the VQLinear."""
        lay = self.layer
        values, cb_scales = round_codebook(self.codebook.detach(), lay.codebook_dtype)
        if cb_scales is not None:
            lay.codebooks.copy_(torch.round(values / cb_scales[:, :, None, None]).to(torch.int8))
            lay.codebook_scales.copy_(cb_scales.to(torch.float16))
        else:
            lay.codebooks.copy_(values.to(torch.float16))
        if self.base_scales is not None:
            scales = self.scales().detach()
            ok = torch.isfinite(scales) & (scales.abs() < 65000) & (scales != 0)
            lay.scales.copy_(torch.where(ok, scales, self.base_scales).to(torch.float16))


def _swap_all(block: nn.Module, old_to_new: dict[nn.Module, nn.Module]) -> None:
    slots = [(parent, name, child) for parent in block.modules() for name, child in parent._modules.items()]
    for parent, name, child in slots:
        if child in old_to_new:
            setattr(parent, name, old_to_new[child])


@contextmanager
def trainable_vq(block: nn.Module, layers: list[VQLinear]) -> Iterator[list[TrainableVQ]]:
    """Swap ``layers`` inside ``block`` for trainable wrappers (float codebooks, scale multipliers) while inside."""
    wrappers = [TrainableVQ(lay) for lay in layers]
    _swap_all(block, {lay: w for lay, w in zip(layers, wrappers)})
    try:
        yield wrappers
    finally:
        _swap_all(block, {w: w.layer for w in wrappers})


def _loss(run, x: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error of the block output over the counted tokens, relative to the target's power."""
    err = (run(x) - target).float().pow(2).sum(-1)  # (batch..., )
    power = target.float().pow(2).sum(-1)
    if mask is not None and tuple(mask.shape) == tuple(err.shape):
        m = mask.to(err.device, torch.float32)
        return (err * m).sum() / (power * m).sum().clamp_min(1e-30)
    return err.sum() / power.sum().clamp_min(1e-30)


def _mean_loss(runs, xs, targets, masks, device) -> float:
    with torch.no_grad():
        losses = [float(_loss(r, x.to(device), t.to(device), m)) for r, x, t, m in zip(runs, xs, targets, masks)]
    return sum(losses) / len(losses)


def finetune_block(
    block: nn.Module,
    runs: list[Callable[[Tensor], Tensor]],
    xs: list[Tensor],
    targets: list[Tensor],
    masks: list,
    steps: int,
) -> tuple[float, float]:
    """``steps`` Adam steps (one calibration batch each, cycling) on the block's VQLinear codebooks and
    scales; ``runs[i](x)`` calls the block on batch i's stream tensor ``x``. Returns (loss before,
    loss after); the block is left unchanged unless the rounded result is better."""
    layers = [m for m in block.modules() if isinstance(m, VQLinear)]
    device = next(iter(block.parameters()), torch.zeros(())).device
    if not layers or steps <= 0:
        return float("nan"), float("nan")
    saved, caches = snapshot(layers)
    before = _mean_loss(runs, xs, targets, masks, device)
    with torch.enable_grad(), trainable_vq(block, layers) as wrappers:
        params = [p for w in wrappers for p in w.parameters()]
        opt = torch.optim.Adam(params, lr=_LEARNING_RATE)
        for step in range(steps):
            i = step % len(xs)
            opt.zero_grad(set_to_none=True)
            _loss(runs[i], xs[i].to(device), targets[i].to(device), masks[i]).backward()
            opt.step()
        with torch.no_grad():
            for w in wrappers:
                w.store()
    refresh_caches(layers)
    after = _mean_loss(runs, xs, targets, masks, device)
    if after >= before:
        restore(layers, saved, caches)
        return before, before
    return before, after


def refresh_caches(layers: list[VQLinear]) -> None:
    """Re-dequantize the cached weights of layers whose stored values changed."""
    for lay in layers:
        lay.cache_dequantized_weight(None if lay.weight_cache is None else lay.weight_cache.dtype)


def snapshot(layers: list[VQLinear]) -> tuple[list[dict[str, Tensor]], list[Tensor | None]]:
    """Copies of the layers' stored tensors and their weight caches, for ``restore``."""
    return [{k: v.clone() for k, v in lay.state_dict().items()} for lay in layers], [lay.weight_cache for lay in layers]


def restore(layers: list[VQLinear], saved: list[dict[str, Tensor]], caches: list[Tensor | None]) -> None:
    for lay, state, cache in zip(layers, saved, caches):
        lay.load_state_dict(state)
        lay.weight_cache = cache
