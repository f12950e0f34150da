"""Running calibration batches through a model and collecting per-layer input Hessians H = X^T X / n.

Batches are what the model takes: a Tensor (``model(batch)``), a tuple/list (``model(*batch)``) or
a mapping (``model(**batch)``). When a mapping carries an ``attention_mask`` whose shape matches a
layer input's leading dims, padded tokens are left out of that layer's Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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


def probe_batch(batch: Any) -> Any:
    """The first sequence of a Hugging Face-style batch (a mapping with 2-d+ ``input_ids``), else the batch.

    Learning which layers run, in which order and how often needs one sequence, not the whole
    batch: on SmolLM2-135M two whole-model passes over 8 x 256 tokens (the LM head included) were
    13 s of a 3-minute budget. Other batch types have no known batch axis and run whole."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, Tensor) or ids.ndim < 2 or ids.shape[0] == 1:
        return batch
    n = ids.shape[0]
    return {k: v[:1] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == n else v for k, v in batch.items()}


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


def execution_order(
    model: nn.Module, layers: dict[str, nn.Module], batch: Any
) -> tuple[list[list[str]], dict[str, int]]:
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


@dataclass
class LayerStats:
    """Second moments of a layer's inputs over the calibration tokens (float32, (in, in)).

    ``hessian`` = X^T X / n for the inputs X the layer gets in the partly compressed model.
    With a reference pass (the original layers swapped back in), ``cross`` = X_ref^T X / n and
    ``reference`` = X_ref^T X_ref / n pair every token with its input in the original model.
    ``reference`` only serves the reported error's denominator tr(W R W^T); when the original
    layer's outputs were measured (``reference_power``), it is not computed.
    """

    hessian: Tensor
    cross: Tensor | None = None
    reference: Tensor | None = None
    reference_power: float | None = None  # instead of ``reference``: mean ||x_ref W^T||^2 per token
    cross_weight: Tensor | None = None  # instead of ``cross``: W C = Y_ref^T X / n (out, in), see BatchPass


@dataclass
class BatchPass:
    """How to run one calibration batch: ``run()`` through the partly compressed model (or block),
    and ``run_reference()`` through the original one (None without the original-output target).
    ``mask`` (bool, leading dims of the layer inputs) marks the tokens that count. When the
    original inputs of the layers were recorded already (``reference_inputs``, per layer, one
    tensor per call), they are used instead of running ``run_reference``."""

    run: Callable[[], Any]
    run_reference: Callable[[], Any] | None = None
    mask: Tensor | None = None
    reference_inputs: dict[str, list[Tensor]] | None = None  # recorded original inputs: replayed, not re-run
    reference_powers: dict[str, float] | None = None  # recorded: sum of ||x_ref W^T||^2 over counted tokens
    # Recorded original outputs Y_ref = X_ref W^T (bias removed), per layer and call, for layers narrower
    # than their input: W C = Y_ref^T X costs tokens x out x in instead of C's tokens x in x in.
    reference_outputs: dict[str, list[Tensor]] | None = None


def flat_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    feats = x.detach()
    if mask is not None and tuple(feats.shape[:-1]) == tuple(mask.shape):
        feats = feats[mask.to(feats.device)]
    return feats.reshape(-1, feats.shape[-1]).float()


def _accumulate(acc: dict[str, Tensor], key: str, a: Tensor, b: Tensor) -> None:
    if key not in acc:
        acc[key] = torch.zeros(a.shape[1], b.shape[1], device=b.device)
    if a is b:
        _accumulate_gram(acc[key], a)
    else:
        acc[key].addmm_(a.T.to(b.device), b)


GRAM_STRIP = 256  # rows per strip of X^T X: 1536 wide, 2,048 tokens, 2 cores: 61 ms instead of 98 (full GEMM)


def _accumulate_gram(acc: Tensor, x: Tensor) -> None:
    """acc += X^T X on and above the diagonal only (``symmetric_from_upper`` fills the rest).

    A Gram matrix is symmetric, so the strips of rows r0:r1 times columns r0:end do ~half of the
    full product's work; every entry is computed as the full product computes it."""
    n = x.shape[1]
    for r0 in range(0, n, GRAM_STRIP):
        r1 = min(n, r0 + GRAM_STRIP)
        acc[r0:r1, r0:].addmm_(x[:, r0:r1].T, x[:, r0:])


def symmetric_from_upper(m: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``m``'s."""
    return torch.triu(m) + torch.triu(m, 1).T


class _StatsHooks:
    """Forward pre-hooks on a group of layers that add every call's inputs into H (and C, R).

    Layers fed the same tensor object within a pass share one sum (``owner``). In a reference
    pass the inputs are only kept, to be paired call by call with the next compressed pass.
    """

    def __init__(self, layers: dict[str, nn.Module], calls_per_batch: dict[str, int], with_reference: bool):
        self.layers = layers
        self.with_reference = with_reference
        self.early_stop = all(calls_per_batch.get(n, 0) == 1 for n in layers)
        self.sums: dict[int, dict[str, Tensor]] = {}
        self.counts: dict[int, int] = {}
        self.owner: dict[str, int] = {}
        self.seen: dict[int, tuple[Tensor, int, Tensor]] = {}  # this batch's inputs: (x, key, flat tokens)
        self.ref_inputs: dict[str, list[Tensor]] = {}
        self.ref_outputs: dict[str, list[Tensor]] = {}
        self.cross_weight: dict[str, Tensor] = {}
        self.powers: dict[str, float] = {}  # per layer, from recorded batches
        self.powers_given = False  # this batch brings its reference powers: no (in, in) R moment
        self.mask: Tensor | None = None
        self.reference_pass = False
        self.calls: dict[str, int] = {}

    def hook(self, name: str) -> Callable:
        def pre_hook(module, args, kwargs):
            x = layer_input(args, kwargs)
            call = self.calls[name] = self.calls.get(name, 0) + 1
            if self.reference_pass:
                self.ref_inputs.setdefault(name, []).append(x)
            else:
                self._add(name, x, call)
            if self.early_stop and len(self.calls) == len(self.layers):
                raise _StopForward

        return pre_hook

    def _add(self, name: str, x: Tensor, call: int) -> None:
        entry = self.seen.get(id(x))
        if entry is None or entry[0] is not x:
            key = self.owner.get(name, len(self.sums))
            feats = flat_tokens(x, self.mask)
            acc = self.sums.setdefault(key, {})
            self.counts[key] = self.counts.get(key, 0) + feats.shape[0]
            _accumulate(acc, "hessian", feats, feats)
            if self.with_reference:
                if len(self.ref_inputs.get(name, [])) < call:
                    raise ValueError(
                        f"calibration: layer {name!r} is called more often with compressed layers than "
                        "in the original model; the original-output target needs the same call pattern"
                    )
                ref = flat_tokens(self.ref_inputs[name][call - 1], self.mask)
                if not all(n in self.ref_outputs for n in self.layers):
                    _accumulate(acc, "cross", ref, feats)
                if not self.powers_given:
                    _accumulate(acc, "reference", ref, ref)
            self.seen[id(x)] = (x, key, feats)
        self.owner.setdefault(name, self.seen[id(x)][1])
        if self.with_reference and name in self.ref_outputs:
            y_ref = flat_tokens(self.ref_outputs[name][call - 1], self.mask)
            _accumulate(self.cross_weight, name, y_ref, self.seen[id(x)][2])

    def run(self, batch_pass: BatchPass) -> None:
        """One batch: the reference pass (if any), then the compressed pass."""
        self.mask = batch_pass.mask
        self.powers_given = self.with_reference and batch_pass.reference_powers is not None
        if self.powers_given:
            for name in self.layers:
                self.powers[name] = self.powers.get(name, 0.0) + batch_pass.reference_powers.get(name, 0.0)
        try:
            if self.with_reference and batch_pass.reference_inputs is not None:
                self.ref_inputs = {n: list(batch_pass.reference_inputs.get(n, [])) for n in self.layers}
                outputs = batch_pass.reference_outputs or {}
                self.ref_outputs = {n: outputs[n] for n in self.layers if n in outputs}
            elif self.with_reference:
                self._run(batch_pass.run_reference, reference=True)
            self._run(batch_pass.run, reference=False)
        finally:
            self.seen.clear()
            self.ref_inputs.clear()
            self.ref_outputs = {}

    def _run(self, run: Callable[[], Any], reference: bool) -> None:
        self.calls, self.reference_pass = {}, reference
        try:
            run()
        except _StopForward:
            pass

    def result(self) -> dict[str, LayerStats]:
        missing = [n for n in self.layers if n not in self.owner]
        if missing:
            raise ValueError(f"calibration: layers {missing} were not called by the calibration batches")
        out: dict[str, LayerStats] = {}
        for name, key in self.owner.items():
            if self.counts[key] == 0:
                raise ValueError(f"calibration: layer {name!r} saw no tokens (every token masked out?)")
            acc = {k: v / self.counts[key] for k, v in self.sums[key].items()}
            acc["hessian"] = symmetric_from_upper(acc["hessian"])
            if "reference" in acc:
                acc["reference"] = symmetric_from_upper(acc["reference"])
            power = self.powers[name] / self.counts[key] if name in self.powers and "reference" not in acc else None
            cross_weight = self.cross_weight[name] / self.counts[key] if name in self.cross_weight else None
            out[name] = LayerStats(acc["hessian"], acc.get("cross"), acc.get("reference"), power, cross_weight)
        return out


def accumulate_statistics(
    layers: dict[str, nn.Module], passes: Iterable[BatchPass], calls_per_batch: dict[str, int], with_reference: bool
) -> dict[str, LayerStats]:
    """Input statistics of ``layers`` over the batch passes (one batch of inputs held at a time).

    If every layer is called once per batch, each pass stops as soon as all of them have run.
    """
    hooks = _StatsHooks(layers, calls_per_batch, with_reference)
    handles = [layer.register_forward_pre_hook(hooks.hook(n), with_kwargs=True) for n, layer in layers.items()]
    skipped = _skip_outputs(layers) if hooks.early_stop else []
    try:
        for batch_pass in passes:
            hooks.run(batch_pass)
    finally:
        for h in handles:
            h.remove()
        for layer in skipped:
            layer.__dict__.pop("forward", None)
    return hooks.result()


def _skip_outputs(layers: dict[str, nn.Module]) -> list[nn.Module]:
    """During passes that stop at the group's last layer, give the group's layers zeros as outputs.

    A group's layers all take the same input tensor (``execution_order``), so none of their outputs
    feeds another's input, and the pass ends before anything else uses them: computing them (q and k
    before v, gate before up: ~16% of a Llama block's linear work in these passes) was wasted."""
    skipped = []
    for layer in layers.values():
        width = getattr(layer, "out_features", None)
        if isinstance(width, int) and "forward" not in layer.__dict__:
            layer.forward = lambda x, *args, width=width, **kwargs: x.new_zeros(*x.shape[:-1], width)
            skipped.append(layer)
    return skipped


def collect_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[Any],
    calls_per_batch: dict[str, int],
    use_reference: Callable[[bool], None] | None = None,
) -> dict[str, LayerStats]:
    """Statistics of ``layers`` over whole-model forwards of ``batches``.

    ``use_reference(True)`` must put the original layers back into the model and
    ``use_reference(False)`` the compressed ones; when given, every batch is run both ways.
    """

    def reference(batch, index):
        use_reference(True)
        try:
            checked_run(model, batch, index)
        finally:
            use_reference(False)

    passes = (
        BatchPass(
            run=lambda b=batch, i=i: checked_run(model, b, i),
            run_reference=None if use_reference is None else (lambda b=batch, i=i: reference(b, i)),
            mask=batch_token_mask(batch),
        )
        for i, batch in enumerate(batches)
    )
    return accumulate_statistics(layers, passes, calls_per_batch, use_reference is not None)
