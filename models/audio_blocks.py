"""SEANet-style 1-D convolutional encoder/decoder (the EnCodec / SoundStream family).

Lengths: the encoder expects a length that is a multiple of ``prod(ratios)`` (the hop);
:class:`~vqlib.models.audio_tokenizer.AudioTokenizer` pads to that before calling it. With
that, every strided convolution divides the length exactly by its stride and every transposed
convolution multiplies it exactly, so ``decoder(encoder(x))`` has the length of ``x``.

Causal mode pads only on the left (and trims transposed outputs only on the right), so no
output sample depends on future input: what a streaming codec needs.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from vqlib.validation import check_choice, choices

ConvNorm = Literal["weight_norm", "none"]
NORMS = choices(ConvNorm)


def _normed(module: nn.Module, norm: str) -> nn.Module:
    check_choice("norm", norm, ConvNorm)
    return weight_norm(module) if norm == "weight_norm" else module


class PaddedConv1d(nn.Module):
    """Conv1d that pads its input itself so that ``out_len == ceil(in_len / stride)``.

    The total padding is ``(kernel - 1) * dilation - (stride - 1)``, all on the left when
    causal, split (extra sample on the left) otherwise; a few more zeros go on the right
    when the length is not a multiple of the stride so the last partial frame is kept.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        causal: bool = False,
        norm: str = "weight_norm",
    ):
        super().__init__()
        self.causal = causal
        self.stride = stride
        self.padding_total = (kernel_size - 1) * dilation - (stride - 1)
        self.effective_kernel = (kernel_size - 1) * dilation + 1
        # Stride 1 with an even, symmetric padding: let the convolution pad (saves a copy per call).
        self.builtin_padding = not causal and stride == 1 and self.padding_total % 2 == 0
        self.conv = _normed(
            nn.Conv1d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                dilation=dilation,
                padding=self.padding_total // 2 if self.builtin_padding else 0,
            ),
            norm,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.builtin_padding:
            return self.conv(x)
        length = x.shape[-1]
        frames = math.ceil(length / self.stride)
        # Right padding so that the last (partial) frame is a full window.
        ideal = (frames - 1) * self.stride + self.effective_kernel - self.padding_total
        extra = max(0, ideal - length)
        if self.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left = self.padding_total - right
            right += extra
        return self.conv(F.pad(x, (left, right)))


class PaddedConvTranspose1d(nn.Module):
    """ConvTranspose1d whose output length is exactly ``in_len * stride``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        causal: bool = False,
        norm: str = "weight_norm",
    ):
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size ({kernel_size}) must be >= stride ({stride})")
        self.conv = _normed(nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride), norm)
        self.causal = causal
        self.trim_total = kernel_size - stride

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.causal:
            left, right = 0, self.trim_total
        else:
            right = self.trim_total // 2
            left = self.trim_total - right
        return y[..., left : y.shape[-1] - right]


class ResidualUnit(nn.Module):
    """ELU -> dilated conv (k=3) -> ELU -> 1x1 conv, plus identity skip (SEANet/SoundStream)."""

    def __init__(
        self,
        channels: int,
        dilation: int,
        *,
        kernel_size: int = 3,
        compress: int = 2,
        causal: bool = False,
        norm: str = "weight_norm",
    ):
        super().__init__()
        hidden = max(1, channels // compress)
        self.block = nn.Sequential(
            nn.ELU(),
            PaddedConv1d(channels, hidden, kernel_size, dilation=dilation, causal=causal, norm=norm),
            nn.ELU(),
            PaddedConv1d(hidden, channels, 1, causal=causal, norm=norm),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResidualLSTM(nn.Module):
    """LSTM over time with a skip connection; input and output (batch, channels, time)."""

    def __init__(self, channels: int, num_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(channels, channels, num_layers=num_layers, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.lstm(rearrange(x, "b c t -> b t c"))
        return x + rearrange(y, "b t c -> b c t")


def _check_ratios(ratios: Sequence[int]) -> list[int]:
    ratios = [int(r) for r in ratios]
    if not ratios or any(r < 1 for r in ratios):
        raise ValueError(f"ratios: expected a non-empty list of positive integers, got {ratios}")
    return ratios


class SEANetEncoder(nn.Module):
    """waveform (b, channels, time) -> latent (b, dimension, time / prod(ratios)).

    Downsampling happens in ``reversed(ratios)`` order (the decoder upsamples in ``ratios``
    order), so ``ratios=[8, 5, 4, 2]`` downsamples by 2, 4, 5, 8 and the widths double after
    each stage: the finest time resolution gets the fewest channels.
    """

    def __init__(
        self,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        residual_dilations: Sequence[int] = (1, 3, 9),
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        lstm_layers: int = 2,
        causal: bool = False,
        norm: str = "weight_norm",
    ):
        super().__init__()
        ratios = _check_ratios(ratios)
        layers: list[nn.Module] = [PaddedConv1d(channels, n_filters, kernel_size, causal=causal, norm=norm)]
        width = n_filters
        for ratio in reversed(ratios):
            layers += [ResidualUnit(width, d, causal=causal, norm=norm) for d in residual_dilations]
            layers += [
                nn.ELU(),
                PaddedConv1d(width, width * 2, 2 * ratio, stride=ratio, causal=causal, norm=norm),
            ]
            width *= 2
        if lstm_layers > 0:
            layers.append(ResidualLSTM(width, lstm_layers))
        layers += [nn.ELU(), PaddedConv1d(width, dimension, last_kernel_size, causal=causal, norm=norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class SEANetDecoder(nn.Module):
    """latent (b, dimension, frames) -> waveform (b, channels, frames * prod(ratios)); the encoder's mirror."""

    def __init__(
        self,
        channels: int = 1,
        dimension: int = 128,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        residual_dilations: Sequence[int] = (1, 3, 9),
        kernel_size: int = 7,
        last_kernel_size: int = 7,
        lstm_layers: int = 2,
        causal: bool = False,
        norm: str = "weight_norm",
    ):
        super().__init__()
        ratios = _check_ratios(ratios)
        width = n_filters * 2 ** len(ratios)
        layers: list[nn.Module] = [PaddedConv1d(dimension, width, kernel_size, causal=causal, norm=norm)]
        if lstm_layers > 0:
            layers.append(ResidualLSTM(width, lstm_layers))
        for ratio in ratios:
            layers += [
                nn.ELU(),
                PaddedConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio, causal=causal, norm=norm),
            ]
            width //= 2
            layers += [ResidualUnit(width, d, causal=causal, norm=norm) for d in residual_dilations]
        layers += [nn.ELU(), PaddedConv1d(width, channels, last_kernel_size, causal=causal, norm=norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z)
