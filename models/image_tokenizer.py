"""ImageTokenizer: a VQGAN-style convolutional autoencoder around any vqlib quantizer.

Images are float tensors in [-1, 1] of shape (b, in_channels, H, W) with H and W divisible by the
downsampling factor ``2 ** (len(ch_mult) - 1)``. ``encode`` gives integer indices of shape (b, H/f, W/f)
plus any trailing axes the quantizer adds (``heads`` for multi-head VectorQuantize, levels for ResidualVQ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from vqlib.base import Quantizer
from vqlib.validation import check_choice

from .hub import HubMixin
from .image_blocks import Decoder, Encoder

# Images may overshoot [-1, 1] slightly after resampling / colour conversion.
_RANGE_TOLERANCE = 1e-3

LatentNorm = Literal["none", "batchnorm"]


@dataclass
class ImageTokenizerOutput:
    reconstruction: Tensor
    indices: Tensor
    quantizer_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class ImageTokenizer(HubMixin, nn.Module):
    """Encoder -> 1x1 conv to ``quantizer.dim`` -> quantizer -> 1x1 conv -> decoder.

    Args:
        quantizer: any vqlib quantizer (VectorQuantize incl. SimVQ / frozen-projector reparameterisations,
            ResidualVQ, FSQ, LFQ). In a LightningCLI config: ``class_path: vqlib.VectorQuantize`` + ``init_args``.
        ch: base channel count; ch_mult: per-resolution multipliers, ``len(ch_mult) - 1`` downsamplings
            (e.g. (1, 2, 2, 4) -> f8, (1, 1, 2, 2, 4) -> f16).
        num_res_blocks: residual blocks per resolution (decoder uses one more, as in taming).
        z_channels: encoder output / decoder input channels.
        use_attention: self-attention in the middle (lowest-resolution) block of encoder and decoder.
        norm_groups: GroupNorm groups (reduced to a divisor of the channel count for small models).
        latent_norm: "batchnorm" centres and scales each latent channel (BatchNorm without affine, running
            statistics in eval) before quantization. Codebooks that are a linear image of a zero-mean cloud
            (SimVQ, frozen projector) cannot follow latents sitting off to one side of the origin, which
            leaves most codes unused; centring the latents removes that offset.
    """

    def __init__(
        self,
        quantizer: Quantizer,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] | list[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        use_attention: bool = True,
        dropout: float = 0.0,
        norm_groups: int = 32,
        latent_norm: LatentNorm = "none",
    ):
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer: expected a vqlib.Quantizer, got {type(quantizer).__name__}")
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or min(ch_mult) < 1:
            raise ValueError(f"ch_mult: expected a non-empty sequence of positive ints, got {ch_mult}")
        for name, value in (
            ("in_channels", in_channels),
            ("ch", ch),
            ("z_channels", z_channels),
            ("norm_groups", norm_groups),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        check_choice("latent_norm", latent_norm, LatentNorm)
        if num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")
        self.init_args = dict(
            in_channels=in_channels, ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
            z_channels=z_channels, use_attention=use_attention, dropout=dropout, norm_groups=norm_groups,
            latent_norm=latent_norm,
        )  # fmt: skip
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        arch = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                    use_attention=use_attention, dropout=dropout, norm_groups=norm_groups)  # fmt: skip
        self.encoder = Encoder(in_channels=in_channels, **arch)
        self.decoder = Decoder(out_channels=in_channels, **arch)
        self.quantizer = quantizer
        quant_conv = nn.Conv2d(z_channels, quantizer.dim, 1)
        self.quant_conv = (
            nn.Sequential(quant_conv, nn.BatchNorm2d(quantizer.dim, affine=False))
            if latent_norm == "batchnorm"
            else quant_conv
        )
        self.post_quant_conv = nn.Conv2d(quantizer.dim, z_channels, 1)

    # -- hub --------------------------------------------------------------------------------------------------
    def _hub_config(self) -> dict:
        return dict(self.init_args)

    def _model_card_fields(self) -> dict[str, str]:
        return {"downsample_factor": str(self.downsample_factor), "codes_per_token": str(self.codes_per_token)}

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def last_layer(self) -> Tensor:
        """Weight of the decoder's output conv (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    @property
    def codes_per_token(self) -> int:
        """Indices stored per latent position: heads (multi-head VQ) or levels (residual VQ)."""
        return self.quantizer.num_codes_per_token

    def latent_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsample_factor
        if h % f or w % f or h <= 0 or w <= 0:
            raise ValueError(
                f"image size: expected H and W positive and divisible by the downsampling factor {f}, got {h}x{w}"
            )
        return h // f, w // f

    def tokens_per_image(self, image_size: int | tuple[int, int]) -> int:
        """Latent positions per image, (H/f) * (W/f); each holds ``codes_per_token`` indices."""
        h, w = self.latent_size(image_size)
        return h * w

    def bits_per_image(self, image_size: int | tuple[int, int]) -> float:
        return self.tokens_per_image(image_size) * self.codes_per_token * math.log2(self.quantizer.codebook_size)

    # -- checks -----------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"images: expected a floating point tensor in [-1, 1], got dtype {images.dtype} "
                "(convert uint8 images with x.float() / 127.5 - 1)"
            )
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images: expected shape (batch, {self.in_channels}, H, W), got {tuple(images.shape)}")
        self.latent_size(tuple(images.shape[-2:]))
        lo, hi = images.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("images: expected finite values, got NaN or Inf")
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"images: expected values in [-1, 1], got min {lo.item():.4g} and max {hi.item():.4g} "
                "(scale [0, 1] images with x * 2 - 1)"
            )

    # -- quantizer plumbing ---------------------------------------------------------------------------------------
    def _codes_to_latent(self, indices: Tensor) -> Tensor:
        q = self.quantizer.decode_channel_first(indices)  # (b, dim, h, w)
        if q.ndim != 4 or q.shape[0] != indices.shape[0] or tuple(q.shape[2:]) != tuple(indices.shape[1:3]):
            raise ValueError(
                f"indices: expected shape (batch, h, w) plus the quantizer's trailing axes "
                f"({self.codes_per_token} codes per position for {type(self.quantizer).__name__}), "
                f"got {tuple(indices.shape)}"
            )
        return q

    # -- public API ---------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> ImageTokenizerOutput:
        self._check_images(images)
        z = self.quant_conv(self.encoder(images))
        out = self.quantizer.forward_channel_first(z)
        reconstruction = self.decoder(self.post_quant_conv(out.quantized))
        return ImageTokenizerOutput(reconstruction, out.indices, out.loss, dict(out.metrics))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (b, C, H, W) in [-1, 1] -> int64 indices (b, H/f, W/f, *quantizer axes)."""
        self._check_images(images)
        was_training = self.training
        self.eval()  # never update codebook state while tokenizing
        try:
            return self.quantizer.forward_channel_first(self.quant_conv(self.encoder(images))).indices
        finally:
            self.train(was_training)

    def decode(self, indices: Tensor) -> Tensor:
        """Indices from :meth:`encode` -> images (b, C, H, W) (not clamped; clamp to [-1, 1] for display)."""
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
        expected_ndim = 4 if self.quantizer.code_axis else 3
        if indices.ndim != expected_ndim:
            trailing = "" if expected_ndim == 3 else f", levels/heads (up to {self.codes_per_token})"
            raise ValueError(
                f"indices: expected shape (batch, h, w{trailing}) for {type(self.quantizer).__name__}, "
                f"got {tuple(indices.shape)}"
            )
        return self.decoder(self.post_quant_conv(self._codes_to_latent(indices)))


__all__ = ["ImageTokenizer", "ImageTokenizerOutput"]
