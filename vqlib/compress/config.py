"""``VQConfig``: one typed object that picks the storage format and the compression algorithm."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

CODEBOOK_DTYPES = ("fp16", "int8")
SCALE_GRANULARITIES = ("row", "group", "none")
PAD_POLICIES = ("pad", "skip", "error")


def registered_algorithms() -> tuple[str, ...]:
    """Names ``algorithm`` may take (``vqlib.compress.algorithms``)."""
    from .algorithms import algorithm_names  # lazy: the algorithms import this module

    return algorithm_names()


def _writes_vector_format(name: str) -> bool:
    from .algorithms import get_algorithm  # lazy: the algorithms import this module

    return get_algorithm(name).vector_format


@dataclass
class VQConfig:
    """Format and algorithm for post-training weight quantization (see ``vqlib.compress.format``).

    Format (ignored by ``scalar_rtn`` except the filters):
        vector_dim: d, weights per vector, taken along the input dimension.
        num_codebooks: M additive codebooks (1 = plain VQ, 2 = additive/residual, AQLM style).
        codebook_bits: B, each codebook has 2**B entries; codes are stored as uint8 for B <= 8
            and int16 for 9 <= B <= 16 (a B < 8 code still takes a full byte and is counted so).
        group_size: input columns sharing one set of codebooks (GPTVQ groups); None = one per layer.
            Must be a multiple of vector_dim.
        codebook_dtype: "fp16", or "int8" with one fp16 scale per codebook.
        scale_granularity: "row" (one fp16 scale per output row), "group" (one per row and
            ``scale_group_size`` input columns) or "none" (no scales stored).
    Algorithm:
        algorithm: "data_free" (k-means on the weights), "calibrated" (Hessian-aware GPTQ-style
            VQ with error feedback and codebook/scale fine-tuning; needs calibration batches) or
            "scalar_rtn" (round-to-nearest, ``scalar_bits`` with one fp16 scale and uint8 zero
            per ``scalar_group_size`` columns; the baseline). Any name registered with
            ``vqlib.compress.algorithms.register_algorithm`` is accepted.
    Layer filter: ``include_modules`` / ``skip_modules`` are fnmatch globs on qualified module
    names, ``skip_types`` are class names, layers with fewer than ``min_weights`` weights are skipped.
    ``filter_fn(module, name) -> bool`` (optional) is asked about each nn.Linear the globs and types
    let through; False leaves it uncompressed. A callable is not data: ``to_dict`` and so the saved
    ``config.json`` and the report leave it out (the layers it kept out are listed there as skipped).
    ``pad`` says what to do when in_features is not a multiple of vector_dim: "pad" zero-pads the
    input dim to the next multiple (the pad is stored and counted, and dropped at forward time),
    "skip" leaves the layer uncompressed with a reason in the report, "error" raises.
    ``original_output_target`` (with calibration): every batch also runs through the original
    layers, so the calibrated method fits each layer's output in the original model (compensating
    the error of the layers already compressed) and all methods report their error against it;
    costs a second forward per batch and keeps the original weights until ``compress`` returns.
    ``damping`` (GPTQ's percdamp) and ``target_damping`` (ridge of that output regression, pulling
    it towards the original weights) are fractions of the mean Hessian diagonal.
    ``kmeans_warm_iters`` (calibrated): the k-means iterations of every codebook group after a layer's first,
    which starts from the previous group's codebooks (``kmeans_iters`` for the first group; 0 starts every group
    from random rows with ``kmeans_iters``).
    ``act_order`` (calibrated): GPTQ's act-order with static groups: the column loop visits codebook groups
    by decreasing input energy (diag H) and each group's vectors likewise; the format is unchanged.
    ``block_size`` (GPTQ columns per lazy-update block) is rounded down to a multiple of vector_dim.
    ``code_sweeps`` (calibrated, with ``finetune_steps`` > 0): after each codebook/scale fine-tune round,
    this many passes re-choose every code for the moved codebooks by exact coordinate descent on the
    layer objective (``vqlib.compress.code_sweep``); each pass can only lower the error.
    ``block_finetune_steps`` (depth-linear path with the original-output target): Adam steps, one
    calibration batch each, on each compressed block's codebooks and scales against the original
    block's output (``vqlib.compress.block_finetune``); 0 turns it off.
    ``strict=True`` turns every non-filter skip (too few vectors for the codebook, unpadded
    layer, layer not reached by calibration) into an error.
    ``target_bits_per_weight``: a bit budget for all compressed layers together; each layer then
    gets its own (vector_dim, num_codebooks, codebook_bits) among candidate formats, chosen by
    measured sensitivity so the total never exceeds the budget (``vqlib.compress.allocation``).
    """

    algorithm: str = field(default="calibrated", metadata={"choices": registered_algorithms})
    vector_dim: int = 4
    num_codebooks: int = 1
    codebook_bits: int = 8
    group_size: int | None = 128
    codebook_dtype: Literal["fp16", "int8"] = "int8"
    scale_granularity: Literal["row", "group", "none"] = "row"
    scale_group_size: int = 128
    scalar_bits: int = 3
    scalar_group_size: int = 128
    pad: Literal["pad", "skip", "error"] = "pad"
    include_modules: list[str] | None = None
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    skip_types: list[str] = field(default_factory=list)
    min_weights: int = 0
    kmeans_iters: int = 25
    kmeans_warm_iters: int = 8
    kmeans_points_per_centroid: int = 256
    refine_passes: int = 1
    block_size: int = 128
    damping: float = 0.03
    act_order: bool = False
    target_damping: float = 0.1
    finetune_steps: int = 8
    code_sweeps: int = 0
    original_output_target: bool = True
    device: str | None = None
    seed: int = 0
    strict: bool = False
    target_bits_per_weight: float | None = None
    block_finetune_steps: int = 0
    # Code, not data: ``to_dict`` (hence the saved config.json and the report) leaves it out.
    filter_fn: Callable[[nn.Module, str], bool] | None = field(default=None, metadata={"saved": False})

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            _need_choice(self, name, choices() if callable(choices) else choices)
        for name, (lo, hi) in _INT_RANGES.items():
            _need_int(self, name, lo, hi)
        for name in ("act_order", "original_output_target", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"VQConfig.{name}: expected True or False, got {getattr(self, name)!r}")
        self._check_multiples()
        self._check_floats()
        self._check_filters()
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"VQConfig.device: expected a device string like 'cuda:0' or None, got {self.device!r}")
        self._check_bit_budget()

    def _check_multiples(self) -> None:
        if self.group_size is not None:
            _need_int(self, "group_size", 1)
            if self.group_size % self.vector_dim:
                raise ValueError(
                    f"VQConfig.group_size: expected a multiple of vector_dim={self.vector_dim}, got {self.group_size}"
                )
        if self.scale_granularity == "group" and self.scale_group_size % self.vector_dim:
            raise ValueError(
                f"VQConfig.scale_group_size: expected a multiple of vector_dim={self.vector_dim}, "
                f"got {self.scale_group_size}"
            )

    def _check_floats(self) -> None:
        if not isinstance(self.damping, (int, float)) or not (0 < float(self.damping) < 1):
            raise ValueError(f"VQConfig.damping: expected a float in (0, 1), got {self.damping!r}")
        if not isinstance(self.target_damping, (int, float)) or not (0 <= float(self.target_damping) <= 100):
            raise ValueError(f"VQConfig.target_damping: expected a float in [0, 100], got {self.target_damping!r}")

    def _check_filters(self) -> None:
        for name in ("skip_modules", "skip_types"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"VQConfig.{name}: expected a list of strings, got {value!r}")
            setattr(self, name, list(value))
        if self.include_modules is not None:
            if not isinstance(self.include_modules, (list, tuple)) or not all(
                isinstance(v, str) for v in self.include_modules
            ):
                raise TypeError(
                    f"VQConfig.include_modules: expected a list of strings or None, got {self.include_modules!r}"
                )
            self.include_modules = list(self.include_modules)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(
                f"VQConfig.filter_fn: expected a callable filter_fn(module, name) -> bool or None, got {self.filter_fn!r}"
            )

    def _check_bit_budget(self) -> None:
        t = self.target_bits_per_weight
        if t is None:
            return
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < float(t) <= 32:
            raise ValueError(f"VQConfig.target_bits_per_weight: expected a number in (0, 32] or None, got {t!r}")
        if not _writes_vector_format(self.algorithm):
            raise ValueError(f"VQConfig.target_bits_per_weight: needs a VQ algorithm, got algorithm={self.algorithm!r}")
        self.target_bits_per_weight = float(t)

    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_bits

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (every field but ``filter_fn``, which is code and is not saved)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in saved_fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQConfig":
        if not isinstance(data, dict):
            raise TypeError(f"VQConfig.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"VQConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "VQConfig":
        """Read a config from a .json or .yaml/.yml file (a flat mapping of VQConfig fields)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"VQConfig.from_file: expected a .json, .yaml or .yml file, got {path.name!r}")
        return cls.from_dict(data or {})


# Checked in this order; the algorithm's choices are looked up when a config is made.
_CHOICES: dict[str, Any] = {
    "algorithm": registered_algorithms,
    "codebook_dtype": CODEBOOK_DTYPES,
    "scale_granularity": SCALE_GRANULARITIES,
    "pad": PAD_POLICIES,
}
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "vector_dim": (1, 64),
    "num_codebooks": (1, 8),
    "codebook_bits": (1, 16),
    "scale_group_size": (1, None),
    "scalar_bits": (1, 8),
    "scalar_group_size": (1, None),
    "min_weights": (0, None),
    "kmeans_iters": (1, None),
    "kmeans_warm_iters": (0, None),
    "kmeans_points_per_centroid": (1, None),
    "refine_passes": (0, None),
    "block_size": (1, None),
    "finetune_steps": (0, None),
    "code_sweeps": (0, None),
    "seed": (0, None),
    "block_finetune_steps": (0, None),
}


def _need_int(cfg: VQConfig, name: str, lo: int, hi: int | None = None) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"VQConfig.{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"VQConfig.{name}: expected a value {rng}, got {value}")


def _need_choice(cfg: VQConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"VQConfig.{name}: expected one of {list(choices)}, got {value!r}")


def saved_fields() -> list[dataclasses.Field]:
    """The fields ``to_dict`` writes and the command line sets (``filter_fn`` is left out)."""
    return [f for f in dataclasses.fields(VQConfig) if f.metadata.get("saved", True)]
