"""A bit budget allocated by sensitivity: ``VQConfig(target_bits_per_weight=2.5)``.

Each layer may take any of a few candidate formats (vector dim d, M codebooks of B bits; the rest
of the config is shared). For every layer and candidate we measure

* its exact storage bits (codes + codebooks + their scales + row scales, from the format), and
* its error: ``sum_j h_j * ||W[:, j] - Q[:, j]||^2``, weighted by the salience ``h_j`` of each input
  column, the mean squared activation of input ``j`` over calibration tokens (the diagonal of the
  layer's Hessian; SliM-LLM's salience is weight x activation of the same kind); ``h = 1`` without
  calibration (weight error). It is estimated from a quick data-free quantization of one codebook
  group on ~4096 vectors (the same number for every candidate, so k-means' small-sample bias is
  alike for all), as that sample's relative error times the layer's salience-weighted energy,
  so errors add up across layers.

Layers' output errors do not cost the model alike (an error in an early ``v_proj`` travels through every
later block). When the calibration batches are language-model batches (``input_ids``), each layer's error
is weighted by its loss sensitivity: the mean squared gradient of the next-token loss with respect to the
layer's outputs on one calibration batch (the empirical Fisher, one number per layer, as HAWQ-v2 and
SliM-LLM weigh layers), so the summed errors approximate the loss increase. Otherwise the weights are 1
and the allocation says so (``Allocation.sensitivity``).

The choice is a multiple-choice knapsack: minimise the summed error subject to the summed bits
<= target x weights. We take each layer's lower convex hull of (bits, error), start every layer at
its cheapest format and repeatedly apply the upgrade with the largest error drop per extra bit
that still fits (the greedy solution of the knapsack's LP relaxation, as in MC-MoE's allocation,
rounded down to whole formats). The result never exceeds the budget; a budget below what the
cheapest formats need is an error naming that minimum.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calibration import batch_token_mask, checked_run, layer_input, run_batch
from .config import VQConfig
from .data_free import quantize_data_free
from .end_to_end import logits_of
from .format import VQLinear, decode_weight

# Codes take a whole byte for B <= 8, so the bits come from d and M: about 8 M / d + overhead.
DEFAULT_CANDIDATES: tuple[dict[str, int], ...] = (
    dict(vector_dim=8, num_codebooks=1, codebook_bits=8),  # ~1.1-1.3 bits
    dict(vector_dim=4, num_codebooks=1, codebook_bits=8),  # ~2.1
    dict(vector_dim=8, num_codebooks=2, codebook_bits=8),  # ~2.2-2.5
    dict(vector_dim=2, num_codebooks=1, codebook_bits=8),  # ~4.1
    dict(vector_dim=4, num_codebooks=2, codebook_bits=8),  # ~4.2
)
SAMPLE_VECTORS = 4096  # vectors of one codebook group sampled per layer and candidate to measure its error
ERROR_KMEANS_ITERS = 4
SALIENCE_BATCHES = 4


@dataclass
class Allocation:
    """Chosen format per layer; ``bits`` are exact storage bits per weight of that layer."""

    target_bits_per_weight: float
    configs: dict[str, VQConfig] = field(default_factory=dict)
    bits: dict[str, float] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    sensitivity: str = "input salience only"  # how the layers' errors were weighted

    @property
    def bits_per_weight(self) -> float:
        total = sum(self.weights.values())
        return sum(self.bits[n] * self.weights[n] for n in self.bits) / total


def format_name(cfg: VQConfig) -> str:
    return f"d{cfg.vector_dim} {cfg.num_codebooks}x{cfg.codebook_bits} g{cfg.group_size}"


def layer_bits(linear: nn.Linear, cfg: VQConfig) -> float:
    """Exact stored bits per weight of ``linear`` in the format ``cfg`` (an empty layer on the meta device)."""
    layer = VQLinear(
        linear.in_features,
        linear.out_features,
        vector_dim=cfg.vector_dim,
        num_codebooks=cfg.num_codebooks,
        codebook_bits=cfg.codebook_bits,
        group_size=cfg.group_size,
        codebook_dtype=cfg.codebook_dtype,
        scale_granularity=cfg.scale_granularity,
        scale_group_size=cfg.scale_group_size,
        bias=False,
        device="meta",
    )
    return layer.bits_per_weight


def candidate_configs(cfg: VQConfig, candidates: Sequence[dict[str, Any]] | None = None) -> list[VQConfig]:
    """The base config with each candidate's fields (and no budget of its own)."""
    out = []
    for cand in candidates or DEFAULT_CANDIDATES:
        try:
            out.append(dataclasses.replace(cfg, target_bits_per_weight=None, **cand))
        except (TypeError, ValueError) as exc:  # e.g. group_size not a multiple of this vector_dim
            raise ValueError(f"allocation: candidate format {cand} does not fit the config: {exc}") from exc
    return out


def _fits(linear: nn.Linear, cfg: VQConfig) -> bool:
    """Every codebook group has at least as many vectors as codebook entries (as ``compress`` requires)."""
    n_vec = -(-linear.in_features // cfg.vector_dim)
    per_group = n_vec if cfg.group_size is None else min(n_vec, cfg.group_size // cfg.vector_dim)
    last = n_vec - (-(-n_vec // per_group) - 1) * per_group
    return linear.out_features * min(per_group, last) >= cfg.codebook_size


@torch.no_grad()
def input_salience(model: nn.Module, layers: dict[str, nn.Linear], batches: list[Any]) -> dict[str, Tensor]:
    """Mean squared activation of every input column of every layer, (in,) float32, over a few batches."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)
    mask: list[Tensor | None] = [None]

    def hook(name):
        def fn(module, args, kwargs):
            x = layer_input(args, kwargs).detach()
            m = mask[0]
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                x = x[m]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] += (x * x).sum(0).cpu()
            counts[name] += x.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        for i, batch in enumerate(batches[:SALIENCE_BATCHES]):
            mask[0] = batch_token_mask(batch)
            checked_run(model, batch, i)
    finally:
        for h in handles:
            h.remove()
    return {
        n: (sums[n] / max(counts[n], 1)).float() if counts[n] else torch.ones(layers[n].in_features) for n in layers
    }


def loss_sensitivity(
    model: nn.Module, layers: dict[str, nn.Linear], batches: list[Any]
) -> tuple[dict[str, float], str]:
    """Per layer, the mean over tokens and outputs of the squared gradient of the next-token loss with
    respect to the layer's output, on the first calibration batch; and a note saying what was used.
    All 1.0 (with the reason) when that batch is not a language-model batch with ``input_ids``."""
    ones = dict.fromkeys(layers, 1.0)
    if not batches:
        return ones, "weight error only (no calibration)"
    batch = batches[0]  # a Mapping, not only a dict: tokenizers return a BatchEncoding (a UserDict)
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), Tensor):
        return ones, "input salience only (no input_ids in the calibration batches for a next-token loss)"
    outputs: dict[str, list[Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_hook(lambda mod, a, y, n=n: outputs[n].append(y)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            logits = logits_of(run_batch(model, batch))
            ids = batch["input_ids"].to(logits.device)
            if tuple(logits.shape[:-1]) != tuple(ids.shape):
                return (
                    ones,
                    f"input salience only (logits {tuple(logits.shape)} do not match input_ids {tuple(ids.shape)})",
                )
            labels = ids[..., 1:].clone()
            mask = batch_token_mask(batch)
            if mask is not None and tuple(mask.shape) == tuple(ids.shape):
                labels[~mask[..., 1:].to(labels.device)] = -100
            loss = F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
            flat = [(n, y) for n, ys in outputs.items() for y in ys if y.requires_grad]
            grads = torch.autograd.grad(loss, [y for _, y in flat], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    power: dict[str, list[float]] = {n: [] for n in layers}
    for (name, _), g in zip(flat, grads):
        if g is not None:
            power[name].append(float(g.double().pow(2).mean()))
    missing = [n for n, p in power.items() if not p]
    if missing:
        return ones, f"input salience only (no loss gradient reached {missing[:3]})"
    tokens = int(labels.ne(-100).sum())
    return {n: sum(p) / len(p) for n, p in power.items()}, f"input salience x loss sensitivity ({tokens} tokens)"


def _sample(weight: Tensor, cfg: VQConfig, seed: int) -> tuple[Tensor, Tensor]:
    """(rows, columns) of one codebook group of ``weight``, rows subsampled to ~SAMPLE_VECTORS vectors."""
    out_features, in_features = weight.shape
    g = torch.Generator().manual_seed(seed)
    width = min(in_features, cfg.group_size or in_features)
    start = int(torch.randint(0, -(-in_features // width), (1,), generator=g)) * width
    cols = torch.arange(start, min(start + width, in_features))
    vec_per_row = -(-cols.numel() // cfg.vector_dim)
    n_rows = min(out_features, max(-(-cfg.codebook_size // vec_per_row), -(-SAMPLE_VECTORS // vec_per_row)))
    rows = torch.randperm(out_features, generator=g)[:n_rows].sort().values
    return rows, cols


def candidate_error(weight: Tensor, salience: Tensor, cfg: VQConfig, seed: int) -> float:
    """Salience-weighted squared error ``sum_j h_j ||W[:, j] - Q[:, j]||^2`` of the whole layer, estimated
    from a quick data-free quantization of one codebook group on a subsample of rows: the sample's
    relative error times the layer's salience-weighted energy ``sum_j h_j ||W[:, j]||^2``."""
    rows, cols = _sample(weight, cfg, seed)
    sample = weight[rows][:, cols]  # (rows', group columns)
    quick = dataclasses.replace(
        cfg, group_size=None, kmeans_iters=min(cfg.kmeans_iters, ERROR_KMEANS_ITERS), refine_passes=0
    )
    parts = quantize_data_free(sample, quick, seed)
    dequant = decode_weight(
        parts.codes,
        parts.codebooks,
        parts.scales,
        vector_dim=quick.vector_dim,
        group_size=None,
        scale_group_size=quick.scale_group_size if quick.scale_granularity == "group" else None,
    )[:, : cols.numel()]
    h = salience[cols][None, :]
    relative = float(((dequant - sample) ** 2 * h).sum()) / max(float((sample**2 * h).sum()), 1e-30)
    return relative * float((weight**2 * salience[None, :]).sum())


def _hull(options: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower convex hull of (total bits, error, candidate) points, cheapest first: the efficient upgrades."""
    pts = []
    for bits, err, idx in sorted(options):
        if pts and err >= pts[-1][1]:
            continue  # more bits for no less error: never worth it
        while len(pts) >= 2:
            (b0, e0, _), (b1, e1, _) = pts[-2], pts[-1]
            if (e0 - e1) * (bits - b1) <= (e1 - err) * (b1 - b0):  # pts[-1] lies above the chord
                pts.pop()
            else:
                break
        pts.append((bits, err, idx))
    return pts


def choose(hulls: dict[str, list[tuple[float, float, int]]], budget_bits: float) -> dict[str, int]:
    """Greedy multiple-choice knapsack on the hulls: index into each hull, total bits <= budget_bits."""
    at = dict.fromkeys(hulls, 0)
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bits:
        raise ValueError("budget below the cheapest formats")
    heap = []

    def push(name):
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0])
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1][0] - h[i][0]
        if used + extra <= budget_bits:
            used += extra
            at[name] = i + 1
            push(name)
        # else: this layer's next step does not fit; its later steps are larger still
    return at


def allocate_formats(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    cfg: VQConfig,
    batches: list[Any] | None = None,
    candidates: Sequence[dict[str, Any]] | None = None,
) -> Allocation:
    """Choose a candidate format per layer so that all ``layers`` together stay within
    ``cfg.target_bits_per_weight`` with the least salience-weighted error (see the module docstring)."""
    target = cfg.target_bits_per_weight
    if target is None:
        raise ValueError("allocate_formats: cfg.target_bits_per_weight is None")
    configs = candidate_configs(cfg, candidates)
    salience = input_salience(model, layers, batches) if batches else {}
    sensitivity, note = loss_sensitivity(model, layers, batches or [])
    hulls, weights = {}, {}
    for i, (name, linear) in enumerate(layers.items()):
        w = linear.weight.detach().float()
        sal = salience.get(name, torch.ones(w.shape[1]))
        weights[name] = w.numel()
        options = [
            (layer_bits(linear, c) * w.numel(), sensitivity[name] * candidate_error(w, sal, c, cfg.seed + 31 * i), k)
            for k, c in enumerate(configs)
            if _fits(linear, c)
        ]
        if not options:
            raise ValueError(f"allocation: no candidate format fits layer {name!r} {tuple(w.shape)}")
        hulls[name] = _hull(options)
    total = sum(weights.values())
    try:
        at = choose(hulls, target * total)
    except ValueError:
        least = sum(h[0][0] for h in hulls.values()) / total
        raise ValueError(
            f"VQConfig.target_bits_per_weight={target} is below the {least:.4f} bits per weight that the cheapest "
            f"candidate formats need for these layers; raise the target or add cheaper candidates"
        ) from None
    alloc = Allocation(target_bits_per_weight=target, weights=weights, sensitivity=note)
    for name, i in at.items():
        bits, _, k = hulls[name][i]
        alloc.configs[name] = configs[k]
        alloc.bits[name] = bits / weights[name]
    return alloc
