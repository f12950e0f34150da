"""Build a VectorQuantize over a large frozen codebook (VQGAN-LC style) from a safetensors file, by config.

A LightningCLI / YAML config cannot hold a (100000, 768) tensor, so configs name this factory as the
quantizer's ``class_path`` (jsonargparse accepts a function whose return type is the expected class)::

    quantizer:
      class_path: vqlib.models.frozen_codebook_quantizer
      init_args: {dim: 8, codebook_path: codebooks/imagenet_clip_100k.safetensors}

The result is a plain ``vqlib.VectorQuantize(codebook_update="gradient", reparam="projector",
init_codebook=features)``: the features stay frozen and a learnable projector maps them to code vectors.
Saved tokenizers record it as ``vqlib.VectorQuantize`` with the codebook's shape and keep the features in
``model.safetensors``, so ``from_pretrained`` never needs the original file.

The file holds one float tensor (codebook_size, feature_dim) — e.g. k-means centroids of CLIP / encoder
features (``vqlib.core.kmeans.kmeans``) — or several, one of which is selected with ``key``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from vqlib.core.settings import Distance, GradientEstimator
from vqlib.vector_quantize import VectorQuantize


def load_codebook_features(path: str | Path, key: str | None = None):
    """The (codebook_size, feature_dim) tensor stored in a safetensors file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"frozen codebook file {path} does not exist (expected a .safetensors file)")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if key is None:
            if len(keys) != 1:
                raise ValueError(f"{path} holds {len(keys)} tensors {keys[:10]}; choose one with key=")
            key = keys[0]
        if key not in keys:
            raise KeyError(f"{path} has no tensor {key!r}; it holds {keys[:10]}")
        features = f.get_tensor(key)
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"{path}[{key!r}]: expected a float (codebook_size, feature_dim) tensor, got {features.dtype} "
            f"{tuple(features.shape)}"
        )
    return features.float()


def frozen_codebook_quantizer(
    dim: int,
    codebook_path: str,
    *,
    key: str | None = None,
    codebook_dim: int | None = None,
    distance: Distance = "euclidean",
    gradient_estimator: GradientEstimator = "ste",
    commitment_weight: float = 0.25,
    codebook_weight: float = 1.0,
    seed: int = 0,
) -> VectorQuantize:
    """VectorQuantize with frozen features from ``codebook_path`` and a learnable projector (VQGAN-LC)."""
    features = load_codebook_features(codebook_path, key)
    return VectorQuantize(
        dim,
        features.shape[0],
        codebook_dim=codebook_dim,
        distance=distance,
        codebook_update="gradient",
        reparam="projector",
        init_codebook=features,
        gradient_estimator=gradient_estimator,
        commitment_weight=commitment_weight,
        codebook_weight=codebook_weight,
        seed=seed,
    )


__all__ = ["frozen_codebook_quantizer", "load_codebook_features"]
