"""Tiny image tokenizers shared by the image / hub / training tests (a few thousand parameters, f4)."""

from __future__ import annotations

import torch
from vqlib.models.image_tokenizer import ImageTokenizer

from vqlib import VectorQuantize


def tiny_tokenizer(quantizer=None, *, ch_mult=(1, 2, 2), seed: int = 0, **kwargs) -> ImageTokenizer:
    torch.manual_seed(seed)
    if quantizer is None:
        quantizer = VectorQuantize(8, 32, seed=seed)
    args = dict(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=8, norm_groups=4, use_attention=True)
    args.update(kwargs)
    return ImageTokenizer(quantizer, **args)


def random_images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1
