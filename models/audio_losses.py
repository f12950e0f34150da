"""Losses, discriminators and metrics for training audio tokenizers.

* :class:`MultiScaleMelLoss`: L1 between log-mel spectrograms at several window sizes (DAC / EnCodec);
  also the validation "mel distance".
* :class:`MultiScaleSTFTDiscriminator`: EnCodec's MS-STFTD; the complex STFT enters as real and
  imaginary channels so the discriminator sees phase.
* :class:`MultiPeriodDiscriminator`: HiFi-GAN's MPD; the waveform folded into (time / p, p) grids.
* :func:`discriminator_loss`, :func:`generator_adversarial_loss` (hinge or least squares) and
  :func:`feature_matching_loss` (L1 between discriminator features, relative to the real ones' scale).
* :func:`si_sdr`: scale-invariant signal-to-distortion ratio in dB.

All discriminators take ``(batch, channels, time)`` and return a list with one
``(logits, feature_maps)`` pair per sub-discriminator.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torchaudio
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from vqlib.validation import check_choice, choices

DiscriminatorOutput = list[tuple[Tensor, list[Tensor]]]
AdversarialLoss = Literal["hinge", "least_squares"]
ADVERSARIAL_LOSSES = choices(AdversarialLoss)


def _check_wave_pair(estimate: Tensor, reference: Tensor) -> None:
    if estimate.shape != reference.shape:
        raise ValueError(
            f"expected estimate and reference of the same shape, got {tuple(estimate.shape)} and {tuple(reference.shape)}"
        )
    if estimate.ndim != 3:
        raise ValueError(f"expected waveforms of shape (batch, channels, time), got {tuple(estimate.shape)}")


class MultiScaleMelLoss(nn.Module):
    """Mean over scales of ``|log10(mel(estimate) + eps) - log10(mel(reference) + eps)|`` (L1).

    One mel spectrogram per window length (hop = window / 4, magnitude, Slaney mel scale).
    Small windows resolve transients, large ones pitch. ``n_mels`` gives the number of mel
    bands per scale (one value for all, or one per window); too many bands for a small
    window leaves empty filters, so keep ``n_mels <= window / 4``.
    """

    def __init__(
        self,
        sample_rate: int,
        window_lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
        n_mels: int | Sequence[int] = (5, 10, 20, 40, 80, 160, 320),
        eps: float = 1e-5,
    ):
        super().__init__()
        window_lengths = list(window_lengths)
        n_mels_list = [int(n_mels)] * len(window_lengths) if isinstance(n_mels, int) else list(n_mels)
        if len(n_mels_list) != len(window_lengths):
            raise ValueError(
                f"n_mels: expected one value or {len(window_lengths)} (one per window), got {len(n_mels_list)}"
            )
        self.sample_rate = sample_rate
        self.eps = eps
        self.window_lengths = window_lengths
        self.transforms = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=sample_rate,
                n_fft=w,
                win_length=w,
                hop_length=max(1, w // 4),
                n_mels=m,
                power=1.0,
                norm="slaney",
                mel_scale="slaney",
            )
            for w, m in zip(window_lengths, n_mels_list)
        )

    def log_mels(self, wave: Tensor) -> list[Tensor]:
        flat = rearrange(wave, "b c t -> (b c) t").float()
        # log(mel + eps), not log(clamp(mel, eps)): a clamp has zero gradient where the estimate is quieter
        # than eps, so a model that has learned to output silence (cheap early on, when the targets hold
        # silent stretches) would get no signal to leave it.
        return [torch.log10(t(flat) + self.eps) for t in self.transforms]

    def forward(self, estimate: Tensor, reference: Tensor) -> Tensor:
        _check_wave_pair(estimate, reference)
        # Mel filterbanks in float32 even under autocast: log of tiny half-precision values is unstable.
        with torch.autocast(device_type=estimate.device.type, enabled=False):
            losses = [F.l1_loss(e, r) for e, r in zip(self.log_mels(estimate), self.log_mels(reference))]
        return torch.stack(losses).mean()


def si_sdr(estimate: Tensor, reference: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SDR in dB, one value per batch item (averaged over channels).

    Both signals are made zero-mean; the reference is scaled by the least-squares factor
    ``<est, ref> / |ref|^2`` and the ratio is ``|target|^2 / |est - target|^2``.
    """
    _check_wave_pair(estimate, reference)
    est = estimate.double() - estimate.double().mean(dim=-1, keepdim=True)
    ref = reference.double() - reference.double().mean(dim=-1, keepdim=True)
    scale = (est * ref).sum(-1, keepdim=True) / (ref.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * ref
    noise = est - target
    ratio = (target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps)
    return (10 * torch.log10(ratio)).mean(dim=-1).to(estimate.dtype)


def _same_padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's MS-STFTD: 2-D convs over (time, frequency) of the complex STFT."""

    def __init__(
        self,
        channels: int = 1,
        n_fft: int = 1024,
        hop_length: int = 256,
        filters: int = 32,
        max_filters: int = 1024,
        filters_scale: int = 1,
        dilations: Sequence[int] = (1, 2, 4),
        kernel_size: tuple[int, int] = (3, 9),
        stride: tuple[int, int] = (1, 2),
    ):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        kernel_size = tuple(kernel_size)
        convs = [weight_norm(nn.Conv2d(2 * channels, filters, kernel_size, padding=_same_padding(kernel_size)))]
        in_ch = filters
        for i, d in enumerate(dilations):
            out_ch = min(filters_scale ** (i + 1) * filters, max_filters)
            convs.append(
                weight_norm(
                    nn.Conv2d(
                        in_ch,
                        out_ch,
                        kernel_size,
                        stride=tuple(stride),
                        dilation=(d, 1),
                        padding=_same_padding(kernel_size, (d, 1)),
                    )
                )
            )
            in_ch = out_ch
        convs.append(weight_norm(nn.Conv2d(in_ch, in_ch, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(in_ch, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b = x.shape[0]
        if x.shape[-1] < self.n_fft:
            raise ValueError(
                f"STFT discriminator with n_fft={self.n_fft} needs at least {self.n_fft} samples, got {x.shape[-1]}"
            )
        spec = torch.stft(
            rearrange(x, "b c t -> (b c) t").float(),
            self.n_fft,
            self.hop_length,
            window=self.window,
            normalized=True,
            center=False,
            return_complex=True,
        )
        spec = rearrange(spec, "(b c) f t -> b c t f", b=b)
        h = torch.cat([spec.real, spec.imag], dim=1)
        fmaps = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            fmaps.append(h)
        return self.conv_post(h), fmaps


class MultiScaleSTFTDiscriminator(nn.Module):
    """EnCodec's multi-scale STFT discriminator: one :class:`STFTDiscriminator` per FFT size (hop = n_fft / 4)."""

    def __init__(
        self,
        channels: int = 1,
        n_ffts: Sequence[int] = (1024, 2048, 512),
        filters: int = 32,
        max_filters: int = 1024,
        filters_scale: int = 1,
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(channels, n, n // 4, filters, max_filters, filters_scale) for n in n_ffts
        )

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        return [d(x) for d in self.discriminators]


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period discriminator: fold time into (time / period, period), convolve along the first axis."""

    def __init__(
        self,
        period: int,
        channels: int = 1,
        widths: Sequence[int] = (32, 128, 512, 1024, 1024),
        kernel_size: int = 5,
        stride: int = 3,
    ):
        super().__init__()
        self.period = period
        convs = []
        in_ch = channels
        for i, w in enumerate(widths):
            s = stride if i < len(widths) - 1 else 1
            convs.append(weight_norm(nn.Conv2d(in_ch, w, (kernel_size, 1), (s, 1), padding=(kernel_size // 2, 0))))
            in_ch = w
        self.convs = nn.ModuleList(convs)
        self.conv_post = weight_norm(nn.Conv2d(in_ch, 1, (3, 1), padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        t = x.shape[-1]
        if t % self.period:
            pad = self.period - t % self.period
            x = F.pad(x, (0, pad), mode="reflect" if pad < t else "constant")
        h = rearrange(x.float(), "b c (t p) -> b c t p", p=self.period)
        fmaps = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.1)
            fmaps.append(h)
        return self.conv_post(h), fmaps


class MultiPeriodDiscriminator(nn.Module):
    """HiFi-GAN's multi-period discriminator (periods 2, 3, 5, 7, 11 by default: primes, so they overlap little)."""

    def __init__(
        self,
        channels: int = 1,
        periods: Sequence[int] = (2, 3, 5, 7, 11),
        widths: Sequence[int] = (32, 128, 512, 1024, 1024),
    ):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels, widths) for p in periods)

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        return [d(x) for d in self.discriminators]


class CombinedDiscriminator(nn.Module):
    """Several multi-discriminators behind one call; their outputs are concatenated."""

    def __init__(self, discriminators: Sequence[nn.Module]):
        super().__init__()
        if not discriminators:
            raise ValueError("CombinedDiscriminator needs at least one discriminator")
        self.discriminators = nn.ModuleList(discriminators)

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        return [out for d in self.discriminators for out in d(x)]


def _check_kind(kind: str) -> None:
    check_choice("adversarial loss", kind, AdversarialLoss)


def discriminator_loss(real: DiscriminatorOutput, fake: DiscriminatorOutput, kind: str = "hinge") -> Tensor:
    """Mean over sub-discriminators. hinge: relu(1 - D(real)) + relu(1 + D(fake));
    least squares: (1 - D(real))^2 + D(fake)^2."""
    _check_kind(kind)
    losses = []
    for (r, _), (f, _) in zip(real, fake):
        if kind == "hinge":
            losses.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            losses.append((1 - r).pow(2).mean() + f.pow(2).mean())
    return torch.stack(losses).mean()


def generator_adversarial_loss(fake: DiscriminatorOutput, kind: str = "hinge") -> Tensor:
    """Mean over sub-discriminators. hinge: relu(1 - D(fake)) (EnCodec); least squares: (1 - D(fake))^2."""
    _check_kind(kind)
    if kind == "hinge":
        losses = [F.relu(1 - f).mean() for f, _ in fake]
    else:
        losses = [(1 - f).pow(2).mean() for f, _ in fake]
    return torch.stack(losses).mean()


def feature_matching_loss(real: DiscriminatorOutput, fake: DiscriminatorOutput, eps: float = 1e-8) -> Tensor:
    """Mean over all layers of ``|f_fake - f_real|_1 / mean|f_real|`` (EnCodec's relative feature loss),
    so layers with large activations do not dominate. Real features are detached."""
    losses = []
    for (_, real_maps), (_, fake_maps) in zip(real, fake):
        for r, f in zip(real_maps, fake_maps):
            r = r.detach()
            losses.append(F.l1_loss(f, r) / (r.abs().mean() + eps))
    return torch.stack(losses).mean()
