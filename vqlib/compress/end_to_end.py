"""Fine-tune a compressed model end to end against the original model's output distribution.

Layer- and block-wise calibration each fit a part of the model to the original's part; their
errors still compound over depth. AQLM's global fine-tune and PV-tuning's continuous step
(Egiazarian et al. 2024, Malinovskii et al. 2024) train what stays continuous when the codes are
fixed: the codebook values, the scales and the normalisation weights, on the KL divergence between
the original model's next-token distribution and the compressed model's. The format does not
change: the result is rounded to the stored dtypes (int8 codebooks with their fp16 scale, fp16 row
scales) and kept only if the rounded model is better on the calibration batches.

    report = finetune_end_to_end(compressed, original, batches, EndToEndConfig(steps=32))
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_choice
from .block_finetune import refresh_caches, restore, snapshot, trainable_vq
from .calibration import as_batch_list, batch_token_mask, run_batch
from .format import VQLinear

LRSchedule = Literal["constant", "cosine"]


@dataclass
class EndToEndConfig:
    """Settings of ``finetune_end_to_end``.

    steps: Adam steps, one calibration batch each (cycling through the batches).
    lr: Adam step size for codebook values, scale multipliers and norm weights (all O(1): codebook
        entries are weights divided by their row scale, scales train as multipliers around 1).
    train_norms: also train the weights of normalisation layers (classes named ``*Norm``, e.g.
        ``nn.LayerNorm``, Llama's ``RMSNorm``): cheap, and they rescale whole residual streams.
    schedule: "constant" keeps ``lr``; "cosine" decays it to 0 over the steps. On SmolLM2-135M at 64 steps
        the cosine decay reached the same calibration KL and no better perplexity (docs/llm.md).
    """

    steps: int = 32
    lr: float = 1e-3
    train_norms: bool = True
    schedule: LRSchedule = "constant"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"EndToEndConfig.steps: expected an int >= 1, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise ValueError(f"EndToEndConfig.lr: expected a float in (0, 1), got {self.lr!r}")
        check_choice("EndToEndConfig.schedule", self.schedule, LRSchedule)


@dataclass
class EndToEndReport:
    """Mean per-token KL(original || compressed) on the calibration batches, before and after."""

    kl_before: float
    kl_after: float
    kept: bool
    steps: int
    seconds: float

    def __str__(self) -> str:
        verdict = "kept" if self.kept else "discarded (no better after rounding)"
        return (
            f"end-to-end fine-tune: {self.steps} steps in {self.seconds:.1f} s, "
            f"KL {self.kl_before:.4f} -> {self.kl_after:.4f}, {verdict}"
        )


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, an object with ``.logits`` (Hugging Face) or a mapping/tuple holding it."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"finetune_end_to_end: expected the model to return logits (a tensor, or an output with .logits), "
        f"got {type(output).__name__}"
    )


def token_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over counted tokens of KL(teacher || student) of the last-axis distributions."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # (batch..., seq)
    if mask is not None and tuple(mask.shape) == tuple(kl.shape):
        m = mask.to(kl.device, kl.dtype)
        return (kl * m).sum() / m.sum().clamp_min(1)
    return kl.mean()


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights (and biases) of the model's normalisation layers: modules whose class name ends in 'Norm'."""
    return [p for m in model.modules() if type(m).__name__.endswith("Norm") for p in m.parameters(recurse=False)]


def _mean_kl(model: nn.Module, teacher: nn.Module, batches: list[Any]) -> float:
    with torch.no_grad():
        kls = [float(token_kl(_logits(model, b), _logits(teacher, b), batch_token_mask(b))) for b in batches]
    return sum(kls) / len(kls)


def _logits(model: nn.Module, batch: Any) -> Tensor:
    return logits_of(run_batch(model, batch))


def finetune_end_to_end(
    model: nn.Module, teacher: nn.Module, calibration: Any, config: EndToEndConfig | None = None
) -> EndToEndReport:
    """Train ``model``'s VQLinear codebooks and scales (codes fixed) and, optionally, its norm weights
    to match ``teacher``'s (the original model's) output distribution on ``calibration`` batches.

    Both models take the same batches and return logits (see ``logits_of``); ``teacher`` is only run
    without gradients. ``model`` is changed in place, and left unchanged when the rounded result is
    not better on the calibration batches.
    """
    cfg = config or EndToEndConfig()
    batches = as_batch_list(calibration)
    if not batches:
        raise ValueError("finetune_end_to_end: expected calibration batches, got none")
    layers = [m for m in model.modules() if isinstance(m, VQLinear)]
    if not layers:
        raise ValueError("finetune_end_to_end: the model has no VQLinear layers (compress it first)")
    start = time.perf_counter()
    norms = norm_parameters(model) if cfg.train_norms else []
    saved, caches = snapshot(layers)
    saved_norms = [p.detach().clone() for p in norms]
    before = _mean_kl(model, teacher, batches)
    with torch.enable_grad(), trainable_vq(model, layers) as wrappers:
        _train(model, teacher, batches, [p for w in wrappers for p in w.parameters()] + norms, cfg)
        with torch.no_grad():
            for w in wrappers:
                w.store()
    refresh_caches(layers)
    after = _mean_kl(model, teacher, batches)
    kept = after < before
    if not kept:
        restore(layers, saved, caches)
        with torch.no_grad():
            for p, old in zip(norms, saved_norms):
                p.copy_(old)
    return EndToEndReport(before, after if kept else before, kept, cfg.steps, time.perf_counter() - start)


def step_size(cfg: EndToEndConfig, step: int) -> float:
    """Adam's step size at ``step`` (0-based) of ``cfg.steps``."""
    if cfg.schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / cfg.steps))


def _train(model: nn.Module, teacher: nn.Module, batches: list[Any], params: list[Tensor], cfg: EndToEndConfig) -> None:
    frozen = [p for p in model.parameters() if p.requires_grad and not any(p is q for q in params)]
    for p in frozen:
        p.requires_grad_(False)  # no gradients for embeddings, biases or uncompressed layers
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = step_size(cfg, step)
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = _logits(teacher, batch)
            opt.zero_grad(set_to_none=True)
            token_kl(_logits(model, batch), target, batch_token_mask(batch)).backward()
            opt.step()
    finally:
        for p in params:
            p.grad = None  # the model's own norm weights must not keep a gradient
        for p in frozen:
            p.requires_grad_(True)
