"""``compress(model, config, calibration=...)``: replace a model's nn.Linear layers in place."""

from __future__ import annotations

import fnmatch
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vqlib.core.seeds import derive_seed

from .algorithms import get_algorithm
from .allocation import allocate_formats
from .block_finetune import finetune_block
from .blockwise import (
    Streams,
    advance,
    batch_masks,
    block_runs,
    capture_block_inputs,
    compress_block,
    find_blocks,
    original_outputs,
    trace_blocks,
)
from .calibrated import output_error
from .calibration import LayerStats, as_batch_list, collect_statistics, execution_order, probe_batch
from .config import VQConfig
from .output_memo import OutputMemo
from .report import CompressionReport, LayerReport, ProgressBar, layer_format, model_bytes, weight_bytes

_log = logging.getLogger(__name__)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _filter_fn_reason(filter_fn: Callable[[nn.Module, str], bool] | None, module: nn.Linear, name: str) -> str | None:
    """Why ``VQConfig.filter_fn`` leaves a layer out (None when it keeps it, or there is none)."""
    if filter_fn is None:
        return None
    keep = filter_fn(module, name)
    if not isinstance(keep, bool):
        raise TypeError(
            f"compress: VQConfig.filter_fn(module, name) must return a bool, got {type(keep).__name__} for {name!r}"
        )
    return None if keep else f"filter_fn {getattr(filter_fn, '__name__', type(filter_fn).__name__)} returned False"


def _filter_reason(name: str, module: nn.Linear, ancestors: list[nn.Module], cfg: VQConfig) -> str | None:
    """Why the user's filter excludes a layer (None when it is selected)."""
    if cfg.include_modules is not None and not _matches(name, cfg.include_modules):
        return "not matched by include_modules"
    if _matches(name, cfg.skip_modules):
        return "matched by skip_modules"
    types = {type(m).__name__ for m in [module, *ancestors]}
    hit = sorted(types & set(cfg.skip_types))
    if hit:
        return f"type {hit[0]} in skip_types"
    reason = _filter_fn_reason(cfg.filter_fn, module, name)  # asked only about layers the globs keep
    if reason is not None:
        return reason
    if any(isinstance(a, nn.MultiheadAttention) for a in ancestors[:1]):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling the module.
        return "inside nn.MultiheadAttention, which reads the weight tensor directly"
    if module.weight.numel() < cfg.min_weights:
        return f"{module.weight.numel()} weights < min_weights={cfg.min_weights}"
    return None


def _quantize_layer(
    linear: nn.Linear, cfg: VQConfig, stats: LayerStats | None, seed: int
) -> tuple[nn.Module, Tensor, Tensor]:
    """Return (new module, original float32 weight, dequantized float32 weight) on the compute device."""
    device = torch.device(cfg.device) if cfg.device else linear.weight.device
    weight = linear.weight.detach().to(device=device, dtype=torch.float32)
    new = get_algorithm(cfg.algorithm).quantize(linear, weight, stats, cfg, seed)
    dequant = new.dequantize_weight(torch.float32).to(device)
    if not torch.isfinite(dequant).all():
        raise RuntimeError("compression produced non-finite weights (this is a bug: please report it)")
    return new, weight, dequant


def _relative_error(weight: Tensor, dequant: Tensor, stats: LayerStats | None) -> tuple[float, str]:
    """||X Q^T - X_ref W^T|| / ||X_ref W^T|| over the calibration tokens ("output", X_ref = inputs in
    the original model), with X_ref = X when there is no reference pass ("layer"), or
    ||Q - W|| / ||W|| without calibration ("weight")."""
    if stats is None:
        return float((dequant - weight).norm() / weight.norm().clamp_min(1e-30)), "weight"
    h = stats.hessian.to(weight.device)
    if stats.cross is None and stats.cross_weight is None:
        base = output_error(torch.zeros_like(weight), weight, h)
        return math.sqrt(output_error(dequant, weight, h) / max(base, 1e-30)), "layer"
    if stats.cross_weight is not None:
        weighted_cross = stats.cross_weight.to(weight.device)
    else:
        weighted_cross = weight @ stats.cross.to(weight.device)
    if stats.reference is not None:
        base = float(((weight @ stats.reference.to(weight.device)) * weight).sum())
    else:  # measured on the original layer's outputs while its inputs were recorded
        base = stats.reference_power
    err = float(((dequant @ h) * dequant).sum()) - 2 * float((dequant * weighted_cross).sum()) + base
    return math.sqrt(max(err, 0.0) / max(base, 1e-30)), "output"


@dataclass
class _Selection:
    """Every nn.Linear by qualified name, the eligible ones, and one report record each."""

    all_linear: dict[str, nn.Linear] = field(default_factory=dict)
    eligible: dict[str, nn.Linear] = field(default_factory=dict)
    records: dict[str, LayerReport] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _resolve_config(model: nn.Module, config: Any, calibration: Any) -> VQConfig:
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: expected a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = VQConfig()
    elif isinstance(config, dict):
        config = VQConfig.from_dict(config)
    elif not isinstance(config, VQConfig):
        raise TypeError(f"compress: expected a VQConfig, a dict or None as config, got {type(config).__name__}")
    if get_algorithm(config.algorithm).needs_calibration and calibration is None:
        raise ValueError(
            f"compress: algorithm={config.algorithm!r} needs calibration batches (calibration=[batch, ...])"
        )
    return config


def _eligibility(name: str, module: nn.Linear, model: nn.Module, cfg: VQConfig) -> tuple[str | None, str]:
    """(skip reason or None, note) for one layer; raises for bad weights or a strict skip."""
    parts = name.split(".") if name else []
    ancestors = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]
    reason = _filter_reason(name, module, ancestors, cfg)
    if reason is not None:
        return reason, ""
    w = module.weight
    if w.device.type == "meta":
        raise ValueError(f"compress: layer {name!r} has no data (meta device); load real weights first")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"compress: layer {name!r} has {bad} non-finite (NaN/Inf) weights; fix the model first")
    reason, note = get_algorithm(cfg.algorithm).format_reason(module, cfg)
    if reason is not None and cfg.strict:
        raise ValueError(f"compress: layer {name!r} cannot be compressed: {reason} (strict=True)")
    return reason, note


def _select_layers(model: nn.Module, cfg: VQConfig) -> _Selection:
    sel = _Selection()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            sel.all_linear[name] = module
    for name, module in sel.all_linear.items():
        rec = LayerReport(name=name or "<model>", shape=tuple(module.weight.shape), status="skipped")
        sel.records[name] = rec
        reason, sel.notes[name] = _eligibility(name, module, model, cfg)
        if reason is None:
            sel.eligible[name] = module
        else:
            rec.reason = reason
    if not sel.eligible:
        detail = "; ".join(f"{r.name}: {r.reason}" for r in sel.records.values()) or "the model has no nn.Linear layers"
        raise ValueError(f"compress: no eligible nn.Linear layers to compress ({detail})")
    return sel


class _Session:
    """One ``compress`` call: compresses groups of layers, swaps them into the model, records them,
    and keeps the originals of the layers compressed since the last ``release_originals`` (they
    are swapped back in for the reference passes of the original-output target)."""

    def __init__(self, model: nn.Module, cfg: VQConfig, sel: _Selection, notify, keep_originals: bool):
        self.model, self.cfg, self.sel, self.notify = model, cfg, sel, notify
        self.keep_originals = keep_originals
        self.order = {n: i for i, n in enumerate(sel.all_linear)}
        self.slots: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, attr, original, new
        self.cached: list[nn.Module] = []  # compressed layers holding a dequantized weight
        self.result = model
        self.called: set[str] = set()
        self.num_compressed = 0
        self.layer_cfgs: dict[str, VQConfig] = {}  # per-layer formats from a bit budget
        self.compressed: dict[str, nn.Module] = {}  # name -> the layer now in the model

    def nothing_compressed(self) -> bool:
        return self.num_compressed == 0

    def compress_group(self, group: list[str], stats: dict[str, LayerStats]) -> None:
        for name in group:
            self._compress_layer(name, stats.get(name))

    def _compress_layer(self, name: str, layer_stats: LayerStats | None) -> None:
        t0 = time.perf_counter()
        cfg, linear, rec = self.layer_cfgs.get(name, self.cfg), self.sel.eligible[name], self.sel.records[name]
        new, weight, dequant = _quantize_layer(
            linear, cfg, layer_stats, derive_seed(cfg.seed, "layer", self.order[name])
        )
        rec.relative_error, rec.error_kind = _relative_error(weight, dequant, layer_stats)
        rec.status, rec.reason, rec.method = "compressed", self.sel.notes.get(name, ""), cfg.algorithm
        rec.bits_per_weight, rec.storage_bytes = new.bits_per_weight, new.storage_bytes()
        rec.format = layer_format(new)
        rec.original_bytes = weight_bytes(linear.weight)
        # Later calibration passes run through this layer: keep its dequantized weight (the
        # memory the original weight had) until the layer's block is done or compress returns.
        new.weight_cache = dequant.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.cached.append(new)
        self.compressed[name] = new
        if name == "":
            self.result = new
        else:
            self._replace(linear, new)
        self.num_compressed += 1
        rec.seconds = time.perf_counter() - t0
        if self.notify:
            self.notify(rec)

    def compressed_layer(self, name: str) -> nn.Module:
        return self.compressed[name]

    def _replace(self, old: nn.Module, new: nn.Module) -> None:
        """Swap ``old`` for ``new`` under every parent that holds it (shared modules included)."""
        for parent in self.model.modules():
            # _modules, not named_children(): the latter hides a second slot holding the same module.
            for child_name, child in list(parent._modules.items()):
                if child is old:
                    setattr(parent, child_name, new)
                    if self.keep_originals:
                        self.slots.append((parent, child_name, old, new))

    def use_original(self, original: bool) -> None:
        for parent, attr, old, new in self.slots:
            setattr(parent, attr, old if original else new)

    def release_originals(self, drop_caches: bool = True) -> None:
        """Forget the kept originals and (unless later whole-model passes still need them) the
        dequantized weights of the layers compressed so far."""
        self.slots.clear()
        if drop_caches:
            self.drop_caches()

    def drop_caches(self) -> None:
        for layer in self.cached:
            layer.cache_dequantized_weight(None)
        self.cached.clear()

    def model_statistics(self, group: list[str], batches: list[Any], calls: dict[str, int], reference: bool = True):
        """Statistics of a group from whole-model passes (the generic path)."""
        if group[0] not in self.called:
            return {}
        layers = {n: self.sel.eligible[n] for n in group}
        use_reference = self.use_original if reference and self.keep_originals and self.slots else None
        stats = collect_statistics(self.model, layers, batches, calls, use_reference)
        if reference and self.keep_originals and self.nothing_compressed():
            for st in stats.values():  # nothing compressed upstream yet: the inputs are the original ones
                st.cross = st.reference = st.hessian
        return stats


def _plan_groups(session: _Session, batch: Any) -> tuple[list[list[str]], dict[str, int]]:
    """Layer groups in execution order; uncalled layers are skipped (algorithms that need calibration)
    or appended."""
    sel, cfg = session.sel, session.cfg
    groups, calls = execution_order(session.model, sel.eligible, batch)
    session.called = {n for g in groups for n in g}
    uncalled = [n for n in sel.eligible if n not in session.called]
    if uncalled and (cfg.strict or not session.called):
        raise ValueError(f"compress: layers {uncalled} are not called when the model runs the calibration batches")
    for name in uncalled:
        if get_algorithm(cfg.algorithm).needs_calibration:
            sel.records[name].reason = "not called by the calibration forward"
            if session.notify:
                session.notify(sel.records[name])
        else:  # data-free methods do not need the inputs; the error is then measured on weights
            groups.append([name])
            note = sel.notes.get(name, "")
            sel.notes[name] = (note + "; " if note else "") + "not called by calibration"
    return groups, calls


def _split_by_block(groups: list[list[str]], place: dict[str, Any], num_blocks: int):
    """(prefix groups, groups per block, suffix groups), or why the groups do not split that way."""
    prefix, per_block, suffix = [], [[] for _ in range(num_blocks)], []
    for group in groups:
        where = {place.get(n, "suffix") for n in group}  # uncalled layers need no inputs
        if len(where) != 1:
            return f"layers {group} share an input across blocks"
        (w,) = where
        if w == "prefix":
            prefix.append(group)
        elif w == "suffix":
            suffix.append(group)
        elif isinstance(w, int):
            per_block[w].append(group)
        else:
            return f"layers {group} run between blocks or in several blocks"
    return prefix, per_block, suffix


def _block_plan(session: _Session, groups, batches, blocks):
    """(block modules, prefix/per-block/suffix groups) for the depth-linear path, or None."""
    found = find_blocks(session.model, session.called, blocks)
    if found is None:
        return None
    container, modules = found
    called = {n: session.sel.eligible[n] for n in session.called}
    place = trace_blocks(session.model, modules, called, probe_batch(batches[0]))
    split = place if isinstance(place, str) else _split_by_block(groups, place, len(modules))
    if isinstance(split, str):
        warnings.warn(
            f"compress: cannot calibrate {container!r} block by block ({split}); falling back to whole-model "
            "passes per layer group, whose cost grows with the square of the depth",
            stacklevel=3,
        )
        return None
    return modules, split


def _run_generic(session: _Session, groups, batches, calls, reference: bool = True) -> None:
    for group in groups:
        session.compress_group(group, session.model_statistics(group, batches, calls, reference))


def _finish_block(
    session: _Session,
    block: nn.Module,
    inputs,
    streams: Streams,
    masks,
    last: bool,
    original: list[Tensor] | None,
    memo: OutputMemo,
) -> Streams:
    """Optionally fine-tune the block against the original block's output; return the next block's inputs.

    ``original``: the original block's outputs on the original stream if already recorded."""
    steps = session.cfg.block_finetune_steps if session.keep_originals else 0
    if last and not steps:
        return streams
    if session.keep_originals and original is None:
        original = original_outputs(block, inputs, streams, session)
    if steps:
        memo.close()  # the fine-tune changes the layers: kept outputs would be stale
        before, after = finetune_block(block, block_runs(block, inputs), streams.compressed, original, masks, steps)
        _log.info("block fine-tune: relative output error %.4g -> %.4g", before, after)
    return streams if last else advance(block, inputs, streams, original, memo)


def _run_blocks(session: _Session, modules: list[nn.Module], split, batches, calls) -> None:
    prefix, per_block, suffix = split
    _run_generic(session, prefix, batches, calls)
    inputs, stream = capture_block_inputs(session.model, modules[0], batches)
    original = stream
    if session.keep_originals and session.slots:
        session.use_original(True)
        try:
            original = capture_block_inputs(session.model, modules[0], batches)[1]
        finally:
            session.use_original(False)
    # Layers after the blocks get whole-model passes: the blocks keep their dequantized weights for them.
    keep_caches = any(g[0] in session.called for g in suffix)
    session.release_originals(not keep_caches)
    streams, masks = Streams(stream, original), batch_masks(batches)
    # Blocks after the last one holding selected layers need not run.
    end = max((b + 1 for b, groups in enumerate(per_block) if groups), default=0)
    for b, block in enumerate(modules[:end]):
        memo = OutputMemo()
        try:
            original = compress_block(
                block, per_block[b], session.sel.eligible, inputs, streams, masks, calls, session, memo
            )
            streams = _finish_block(session, block, inputs, streams, masks, b + 1 == end, original, memo)
        finally:
            memo.close()
        _log.debug("block %d: %d layer outputs reused, %d computed", b, memo.hits, memo.misses)
        session.release_originals(not keep_caches)
    # After the blocks only the partly compressed model is left: these layers fit their own output.
    _run_generic(session, suffix, batches, calls, reference=False)


def compress(
    model: nn.Module,
    config: VQConfig | dict[str, Any] | None = None,
    *,
    calibration: Any = None,
    progress: bool | Callable[[LayerReport], None] = False,
    blocks: str | None = "auto",
) -> tuple[nn.Module, CompressionReport]:
    """Compress the ``nn.Linear`` layers of ``model`` in place; return ``(model, report)``.

    ``calibration``: re-iterable batches (list, DataLoader) the model accepts (see
    ``vqlib.compress.calibration``); required for ``algorithm="calibrated"``, optional otherwise
    (with it, errors are reported on the layer outputs instead of the weights). Layers are handled
    in execution order and each one's Hessian is collected with the earlier layers already
    compressed; only one group of layers sharing an input holds a Hessian at a time.
    ``blocks``: the container of repeated blocks (e.g. "model.layers") to calibrate block by
    block, at a cost linear in depth (``vqlib.compress.blockwise``); "auto" finds it, None always
    runs whole-model passes.
    ``progress``: True prints a per-layer progress bar on stderr; a callable receives each
    ``LayerReport`` as it is done. If ``model`` itself is an nn.Linear, the returned model is the
    new layer.
    """
    start = time.perf_counter()
    cfg = _resolve_config(model, config, calibration)
    report = CompressionReport(config=cfg.to_dict(), model_bytes_before=model_bytes(model))
    sel = _select_layers(model, cfg)
    notify = ProgressBar(len(sel.records)) if progress is True else (progress or None)
    for name, rec in sel.records.items():
        if name not in sel.eligible and notify:
            notify(rec)
    batches = as_batch_list(calibration)
    session = _Session(model, cfg, sel, notify, keep_originals=cfg.original_output_target and bool(batches))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if cfg.target_bits_per_weight is not None:  # a bit budget: one format per layer, by sensitivity
                allocation = allocate_formats(model, sel.eligible, cfg, batches)
                session.layer_cfgs, report.allocation = allocation.configs, allocation.sensitivity
            _compress_all(session, batches, blocks)
    finally:
        session.drop_caches()
        model.train(was_training)
        session.result.train(was_training)
    report.layers = list(sel.records.values())
    report.model_bytes_after = model_bytes(session.result)
    report.seconds = time.perf_counter() - start
    return session.result, report


def _compress_all(session: _Session, batches: list[Any], blocks: str | None) -> None:
    if not batches:
        for name in session.sel.eligible:
            session.compress_group([name], {})
        return
    groups, calls = _plan_groups(session, probe_batch(batches[0]))
    plan = _block_plan(session, groups, batches, blocks)
    if plan is None:
        _run_generic(session, groups, batches, calls)
    else:
        _run_blocks(session, *plan, batches, calls)
