"""``compress(model, config, calibration=...)``: replace a model's nn.Linear layers in place."""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .calibrated import gptq_vq, output_error
from .calibration import LayerStats, as_batch_list, collect_statistics, execution_order
from .config import VQConfig
from .data_free import quantize_data_free
from .format import VQLinear, num_groups
from .report import CompressionReport, LayerReport, ProgressBar, model_bytes, weight_bytes
from .scalar import ScalarLinear

_LAYER_SEED_STRIDE = 104729  # a prime: layers get well-separated, reproducible k-means seeds


class _Skip(Exception):
    pass


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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
    if any(isinstance(a, nn.MultiheadAttention) for a in ancestors[:1]):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling the module.
        return "inside nn.MultiheadAttention, which reads the weight tensor directly"
    if module.weight.numel() < cfg.min_weights:
        return f"{module.weight.numel()} weights < min_weights={cfg.min_weights}"
    return None


def _format_reason(module: nn.Linear, cfg: VQConfig) -> tuple[str | None, str]:
    """(skip reason or None, note) for format constraints; raises for a config that can never work."""
    out_features, in_features = module.weight.shape
    if cfg.algorithm == "scalar_rtn":
        return None, ""
    note = ""
    d = cfg.vector_dim
    if in_features % d:
        if cfg.pad == "error":
            raise ValueError(
                f"in_features={in_features} is not divisible by vector_dim={d} (set pad='pad' to zero-pad "
                f"or pad='skip' to leave such layers uncompressed)"
            )
        if cfg.pad == "skip":
            return f"in_features={in_features} not divisible by vector_dim={d} (pad='skip')", ""
        note = f"padded {in_features}->{math.ceil(in_features / d) * d} input columns"
    n_vec = math.ceil(in_features / d)
    per_group = n_vec if cfg.group_size is None else cfg.group_size // d
    last = n_vec - (num_groups(n_vec * d, cfg.group_size) - 1) * per_group
    fewest = out_features * min(per_group, last)
    if fewest < cfg.codebook_size:
        return (
            f"a codebook group has only {fewest} vectors for {cfg.codebook_size} codebook entries "
            f"(codebook_bits={cfg.codebook_bits}); use smaller codebook_bits, vector_dim or larger group_size"
        ), note
    return None, note


def _quantize_layer(linear: nn.Linear, cfg: VQConfig, stats: LayerStats | None, seed: int) -> tuple[nn.Module, Tensor, Tensor]:
    """Return (new module, original float32 weight, dequantized float32 weight) on the compute device."""
    device = torch.device(cfg.device) if cfg.device else linear.weight.device
    weight = linear.weight.detach().to(device=device, dtype=torch.float32)
    if cfg.algorithm == "scalar_rtn":
        new: nn.Module = ScalarLinear.from_linear(linear, cfg.scalar_bits, cfg.scalar_group_size)
    else:
        if cfg.algorithm == "data_free":
            parts = quantize_data_free(weight, cfg, seed)
        else:
            cross = None if stats.cross is None or stats.cross is stats.hessian else stats.cross.to(device)
            parts = gptq_vq(weight, stats.hessian.to(device), cfg, seed, cross=cross)
        new = VQLinear.from_parts(
            linear,
            codes=parts.codes,
            codebook_values=parts.codebooks,
            codebook_scales=parts.codebook_scales,
            scales=parts.scales,
            vector_dim=cfg.vector_dim,
            codebook_bits=cfg.codebook_bits,
            group_size=cfg.group_size,
            codebook_dtype=cfg.codebook_dtype,
            scale_granularity=cfg.scale_granularity,
            scale_group_size=cfg.scale_group_size,
        )
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
    if stats.cross is None:
        base = output_error(torch.zeros_like(weight), weight, h)
        return math.sqrt(output_error(dequant, weight, h) / max(base, 1e-30)), "layer"
    cross, ref = stats.cross.to(weight.device), stats.reference.to(weight.device)
    base = float(((weight @ ref) * weight).sum())
    err = float(((dequant @ h) * dequant).sum()) - 2 * float((dequant * (weight @ cross)).sum()) + base
    return math.sqrt(max(err, 0.0) / max(base, 1e-30)), "output"


class _Swapper:
    """Replaces layers in place and can temporarily put the originals back (the reference pass)."""

    def __init__(self, model: nn.Module, keep_originals: bool):
        self.model = model
        self.keep_originals = keep_originals
        self.slots: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, attr, original, new

    def replace(self, old: nn.Module, new: nn.Module) -> None:
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


def compress(
    model: nn.Module,
    config: VQConfig | dict[str, Any] | None = None,
    *,
    calibration: Any = None,
    progress: bool | Callable[[LayerReport], None] = False,
) -> tuple[nn.Module, CompressionReport]:
    """Compress the ``nn.Linear`` layers of ``model`` in place; return ``(model, report)``.

    ``calibration``: re-iterable batches (list, DataLoader) the model accepts (see
    ``vqlib.compress.calibration``); required for ``algorithm="calibrated"``, optional otherwise
    (with it, errors are reported on the layer outputs instead of the weights). Layers are handled
    in execution order and each one's Hessian is collected with the earlier layers already
    compressed; only one group of layers sharing an input holds a Hessian at a time.
    ``progress``: True prints a per-layer progress bar on stderr; a callable receives each
    ``LayerReport`` as it is done. If ``model`` itself is an nn.Linear, the returned model is the
    new layer.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: expected a torch.nn.Module, got {type(model).__name__}")
    if config is None:
        config = VQConfig()
    elif isinstance(config, dict):
        config = VQConfig.from_dict(config)
    elif not isinstance(config, VQConfig):
        raise TypeError(f"compress: expected a VQConfig, a dict or None as config, got {type(config).__name__}")
    cfg = config
    if cfg.algorithm == "calibrated" and calibration is None:
        raise ValueError("compress: algorithm='calibrated' needs calibration batches (calibration=[batch, ...])")
    report = CompressionReport(config=cfg.to_dict(), model_bytes_before=model_bytes(model))

    ancestors: dict[str, list[nn.Module]] = {}
    all_linear: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".") if name else []
            ancestors[name] = [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) - 1, -1, -1)]
            all_linear[name] = module
    eligible: dict[str, nn.Linear] = {}
    records: dict[str, LayerReport] = {}
    notes: dict[str, str] = {}
    for name, module in all_linear.items():
        rec = LayerReport(name=name or "<model>", shape=tuple(module.weight.shape), status="skipped")
        records[name] = rec
        reason = _filter_reason(name, module, ancestors[name], cfg)
        if reason is None:
            w = module.weight
            if w.device.type == "meta":
                raise ValueError(f"compress: layer {name!r} has no data (meta device); load real weights first")
            if not torch.isfinite(w).all():
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(f"compress: layer {name!r} has {bad} non-finite (NaN/Inf) weights; fix the model first")
            reason, notes[name] = _format_reason(module, cfg)
            if reason is not None and cfg.strict:
                raise ValueError(f"compress: layer {name!r} cannot be compressed: {reason} (strict=True)")
        if reason is None:
            eligible[name] = module
        else:
            rec.reason = reason
    if not eligible:
        detail = "; ".join(f"{r.name}: {r.reason}" for r in records.values()) or "the model has no nn.Linear layers"
        raise ValueError(f"compress: no eligible nn.Linear layers to compress ({detail})")

    notify = ProgressBar(len(records)) if progress is True else (progress or None)
    for name, rec in records.items():
        if name not in eligible and notify:
            notify(rec)

    batches = as_batch_list(calibration)
    was_training = model.training
    model.eval()
    result = model
    created: list[nn.Module] = []
    swapper = _Swapper(model, keep_originals=cfg.original_output_target and bool(batches))
    try:
        with torch.no_grad():
            if batches:
                groups, calls = execution_order(model, eligible, batches[0])
                called = {n for g in groups for n in g}
                uncalled = [n for n in eligible if n not in called]
                if uncalled and (cfg.strict or not called):
                    raise ValueError(
                        f"compress: layers {uncalled} are not called when the model runs the calibration batches"
                    )
                for name in uncalled:
                    if cfg.algorithm == "calibrated":
                        records[name].reason = "not called by the calibration forward"
                        if notify:
                            notify(records[name])
                    else:  # data-free methods do not need the inputs; the error is then measured on weights
                        groups.append([name])
                        notes[name] = (notes.get(name, "") + "; " if notes.get(name) else "") + "not called by calibration"
            else:
                groups, calls, called = [[n] for n in eligible], {}, set()
            order = {n: i for i, n in enumerate(all_linear)}
            for group in groups:
                layers = {n: eligible[n] for n in group}
                stats = {}
                if group[0] in called:
                    use_reference = swapper.use_original if cfg.original_output_target and swapper.slots else None
                    stats = collect_statistics(model, layers, batches, calls, use_reference)
                    if cfg.original_output_target and use_reference is None:
                        # Nothing compressed upstream yet: the inputs are the original ones.
                        for st in stats.values():
                            st.cross = st.reference = st.hessian
                for name in group:
                    t0 = time.perf_counter()
                    linear = eligible[name]
                    layer_stats = stats.get(name)
                    new, weight, dequant = _quantize_layer(linear, cfg, layer_stats, cfg.seed + _LAYER_SEED_STRIDE * order[name])
                    rec = records[name]
                    rec.relative_error, rec.error_kind = _relative_error(weight, dequant, layer_stats)
                    rec.status, rec.reason = "compressed", notes.get(name, "")
                    rec.method = cfg.algorithm
                    rec.bits_per_weight = new.bits_per_weight
                    rec.storage_bytes = new.storage_bytes()
                    rec.original_bytes = weight_bytes(linear.weight)
                    # Later calibration passes run through this layer: keep its dequantized weight
                    # (the memory the original weight had) until compress returns.
                    new.weight_cache = dequant.to(device=linear.weight.device, dtype=linear.weight.dtype)
                    created.append(new)
                    if name == "":
                        result = new
                    else:
                        swapper.replace(linear, new)
                    rec.seconds = time.perf_counter() - t0
                    if notify:
                        notify(rec)
                del stats
    finally:
        for layer in created:
            layer.cache_dequantized_weight(None)
        model.train(was_training)
        if result is not model:
            result.train(was_training)
    report.layers = list(records.values())
    report.model_bytes_after = model_bytes(result)
    report.seconds = time.perf_counter() - start
    return result, report
