"""One typed settings object for a learned codebook, shared by the codebook core, VectorQuantize and ResidualVQ.

``VectorQuantize`` keeps these options as flat keyword arguments for users and gathers them into a
:class:`CodebookSettings`; ``ResidualVQ`` takes the same names (``**codebook_options``) or a settings object;
the :class:`~vqlib.core.codebook.Codebook` core reads what it needs from it. A new codebook option is a new
field here, and every quantizer built on codebooks accepts it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from ..validation import check_choice
from .search import DEFAULT_MAX_ELEMENTS, SearchBackend

Distance = Literal["euclidean", "cosine"]
CodebookUpdate = Literal["ema", "gradient", "frozen"]
Reparam = Literal["none", "simvq", "projector"]
GradientEstimator = Literal["ste", "rotation"]


@dataclass(frozen=True)
class CodebookSettings:
    """Every option of a learned codebook (see :class:`vqlib.VectorQuantize` for what each one does).

    distance: "euclidean" or "cosine"; codebook_update: "ema" (``decay``, Laplace smoothing ``eps``),
    "gradient" or "frozen"; reparam: "none", "simvq" or "projector"; kmeans_init / kmeans_iters: Faiss
    k-means on the first training batch; dead_code_window / usage_window: dead-code restart and usage
    windows in steps; gradient_estimator: "ste" or "rotation"; commitment_weight / codebook_weight: loss
    weights; search_max_elements / search_backend: nearest-code search memory bound and backend.
    """

    distance: Distance = "euclidean"
    codebook_update: CodebookUpdate = "ema"
    decay: float = 0.99
    eps: float = 1e-5
    reparam: Reparam = "none"
    kmeans_init: bool = False
    kmeans_iters: int = 10
    dead_code_window: int = 0
    usage_window: int = 100
    gradient_estimator: GradientEstimator = "ste"
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    search_max_elements: int = DEFAULT_MAX_ELEMENTS
    search_backend: SearchBackend = "auto"

    def __post_init__(self) -> None:
        check_choice("distance", self.distance, Distance)
        check_choice("codebook_update", self.codebook_update, CodebookUpdate)
        check_choice("reparam", self.reparam, Reparam)
        check_choice("gradient_estimator", self.gradient_estimator, GradientEstimator)
        check_choice("search_backend", self.search_backend, SearchBackend)
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.usage_window < 1:
            raise ValueError(f"usage_window must be >= 1, got {self.usage_window}")
        if self.kmeans_iters < 1 or self.dead_code_window < 0 or self.search_max_elements < 1:
            raise ValueError(
                "expected kmeans_iters >= 1, dead_code_window >= 0 and search_max_elements >= 1, got "
                f"{self.kmeans_iters}, {self.dead_code_window} and {self.search_max_elements}"
            )
        if self.commitment_weight < 0 or self.codebook_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.commitment_weight} and {self.codebook_weight}")

    def _check_combinations(self) -> None:
        reparam, update = self.reparam, self.codebook_update
        if reparam != "none" and update != "gradient":
            raise ValueError(
                f"reparam={reparam!r} learns its linear map by gradient: use codebook_update='gradient', got {update!r}"
            )
        if reparam != "none" and self.kmeans_init:
            raise ValueError(
                f"kmeans_init=True is incompatible with reparam={reparam!r} (its codebook is a frozen basis)"
            )
        if self.dead_code_window > 0 and (reparam != "none" or update == "frozen"):
            raise ValueError(
                "dead_code_window > 0 needs codes that can be re-seeded (codebook_update 'ema' or 'gradient' with "
                f"reparam='none'), got codebook_update={update!r}, reparam={reparam!r}"
            )

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_locals(cls, init_locals: dict[str, Any]) -> CodebookSettings:
        """The settings named in a constructor's ``locals()`` (a surface that lists every option flat)."""
        return cls(**{name: init_locals[name] for name in cls.names()})

    @classmethod
    def check_names(cls, owner: str, options: dict[str, Any]) -> None:
        """TypeError naming any key of ``options`` that is not a codebook option."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"{owner}: unknown codebook option(s) {unknown}; expected names from {list(cls.names())}")

    def as_kwargs(self) -> dict[str, Any]:
        """The flat keyword arguments (``VectorQuantize(dim, size, **settings.as_kwargs())``)."""
        return asdict(self)


__all__ = ["CodebookSettings", "CodebookUpdate", "Distance", "GradientEstimator", "Reparam"]
