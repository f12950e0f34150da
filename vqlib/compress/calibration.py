"""Running calibration batches through a model and collecting per-layer input Hessians H = X^T X / n.

Batches are what the model takes: a Tensor (``model(batch)``), a tuple/list (``model(*batch)``) or
a mapping (``model(**batch)``). When a mapping carries an ``attention_mask`` whose shape matches a
layer input's leading dims, padded tokens are left out of that layer's Hessian.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    """Raised from a hook once every layer of interest has seen its input: the rest of the forward is wasted."""


def as_batch_list(calibration: Any) -> list[Any]:
    if calibration is None:
        return []
    if isinstance(calibration, (Tensor, Mapping)):
        return [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration: expected an iterable of batches (list, DataLoader, ...), got {type(calibration).__name__}"
        )
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration: got an empty iterable of batches")
    return batches


def run_batch(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_token_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"].bool()
    return None


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"Tensor{tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def checked_run(model: nn.Module, batch: Any, index: int) -> None:
    try:
        run_batch(model, batch)
    except _StopForward:
        raise
    except Exception as exc:  # re-raised with what the user needs to fix their batches
        raise ValueError(
            f"calibration batch {index} ({_describe(batch)}) could not be run through the model: "
            f"{type(exc).__name__}: {exc}. Batches are passed as model(batch), model(*batch) for "
            "tuples/lists, or model(**batch) for mappings."
        ) from exc


def layer_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["input"]


def execution_order(model: nn.Module, layers: dict[str, nn.Module], batch: Any) -> tuple[list[list[str]], dict[str, int]]:
    """Run one batch; return the layers in first-call order grouped by shared input tensor, and call counts.

    Layers whose first call received the very same input tensor object as the previous layer's
    (e.g. attention q/k/v) form one group: they share a Hessian and are compressed together.
    """
    order: list[str] = []
    first_input: dict[str, Tensor] = {}
    calls: dict[str, int] = {name: 0 for name in layers}
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs):
            calls[name] += 1
            if name not in first_input:
                first_input[name] = layer_input(args, kwargs)
                order.append(name)

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    try:
        checked_run(model, batch, 0)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in order:
        if groups and first_input[name] is first_input[groups[-1][-1]] and first_input[name] is not None:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups, calls


def collect_hessians(
    model: nn.Module, layers: dict[str, nn.Module], batches: list[Any], calls_per_batch: dict[str, int]
) -> dict[str, Tensor]:
    """Accumulate H = X^T X / n (float32, on the input's device) for every layer in ``layers``.

    Layers fed the same tensor object in a call share one Hessian computation. If every layer is
    called once per batch, the forward stops as soon as all of them have run.
    """
    sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    owner: dict[str, int] = {}
    seen_this_batch: dict[int, tuple[Tensor, int]] = {}
    state: dict[str, Any] = {"mask": None, "done": set()}
    early_stop = all(calls_per_batch.get(n, 0) == 1 for n in layers)
    handles = []

    def make_hook(name):
        def hook(module, args, kwargs):
            x = layer_input(args, kwargs)
            # The tensor itself is kept so that its id cannot be reused by another tensor in this batch.
            entry = seen_this_batch.get(id(x))
            key = entry[1] if entry is not None and entry[0] is x else None
            if key is None:
                key = len(sums) if name not in owner else owner[name]
                feats = x.detach()
                mask = state["mask"]
                if mask is not None and tuple(feats.shape[:-1]) == tuple(mask.shape):
                    feats = feats[mask.to(feats.device)]
                feats = feats.reshape(-1, feats.shape[-1]).float()
                if key not in sums:
                    sums[key] = torch.zeros(feats.shape[1], feats.shape[1], device=feats.device)
                    counts[key] = 0
                sums[key].addmm_(feats.T, feats)
                counts[key] += feats.shape[0]
                seen_this_batch[id(x)] = (x, key)
            owner.setdefault(name, key)
            state["done"].add(name)
            if early_stop and len(state["done"]) == len(layers):
                raise _StopForward

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    try:
        for i, batch in enumerate(batches):
            seen_this_batch.clear()
            state["done"] = set()
            state["mask"] = batch_token_mask(batch)
            try:
                checked_run(model, batch, i)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        seen_this_batch.clear()
    missing = [n for n in layers if n not in owner]
    if missing:
        raise ValueError(f"calibration: layers {missing} were not called by the calibration batches")
    out: dict[str, Tensor] = {}
    for name, key in owner.items():
        if counts[key] == 0:
            raise ValueError(f"calibration: layer {name!r} saw no tokens (every token masked out?)")
        out[name] = sums[key] / counts[key]
    return out
