"""The one place seeds are derived from a user's seed, so that the strides live in one table.

Every random stream of vqlib (initial codes, per-head and per-level codebooks, quantizer dropout draws,
dead-code restarts, epoch shuffles, compression's k-means groups and layers) is seeded with
``seed * scale + stride * index + offset`` for its stream. Large primes as strides keep streams derived
from one user seed apart for any realistic count of heads, levels, groups or steps; the table's values are
those the library has always used, so results stay bit-identical.
"""

from __future__ import annotations

from typing import Literal

from ..validation import check_choice

SeedStream = Literal[
    "codebook_init",  # initial codes / SimVQ basis of one codebook
    "head",  # i-th per-head codebook of a VectorQuantize
    "level",  # i-th level of a ResidualVQ
    "quantizer_dropout",  # ResidualVQ's level-count draw at training step i
    "dead_code_restart",  # replacement draw at codebook step i
    "epoch_shuffle",  # data order of epoch i
    "codebook_group",  # i-th k-means group of a compressed layer
    "layer",  # i-th compressed layer
]

# stream -> (scale, stride, offset)
_STREAMS: dict[str, tuple[int, int, int]] = {
    # Offset so that a user's torch.manual_seed(seed) data never coincides with the initial codes.
    "codebook_init": (1, 0, 0x5EED),
    "head": (1, 1, 0),
    "level": (1, 7919, 0),
    "quantizer_dropout": (100003, 1, 0),
    "dead_code_restart": (1, 1, 0),
    "epoch_shuffle": (1_000_003, 1, 0),
    "codebook_group": (1, 7919, 0),
    "layer": (1, 104729, 0),
}


def derive_seed(seed: int, stream: SeedStream, index: int = 0) -> int:
    """Seed of the ``index``-th member (head, level, step, epoch, ...) of ``stream`` under the user's ``seed``."""
    check_choice("stream", stream, SeedStream)
    scale, stride, offset = _STREAMS[stream]
    return int(seed) * scale + stride * int(index) + offset
