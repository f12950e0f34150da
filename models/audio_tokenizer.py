"""AudioTokenizer: an EnCodec-style neural audio codec (SEANet encoder/decoder + residual VQ).

Conventions
-----------
* Waveforms are float tensors ``(batch, channels, time)`` at the model's ``sample_rate``, nominally in
  [-1, 1]. :meth:`AudioTokenizer.prepare` turns any other input into that form:

  - 1-D ``(time,)`` means one mono clip, 2-D ``(channels, time)`` one clip, 3-D is a batch;
  - channels: a stereo (or any multi-channel) input to a mono model is averaged over channels;
    a mono input to a stereo model is duplicated into both channels; any other mismatch
    (e.g. 6 channels into a stereo model) is an error;
  - sample rate: inputs at another rate are resampled with ``torchaudio.functional.resample``
    (windowed-sinc band-limited interpolation).

* Lengths: the codec runs on frames of ``hop_length = prod(ratios)`` samples. A clip whose length is
  not a multiple of the hop is zero-padded on the right up to the next multiple before encoding, so it
  gives ``ceil(time / hop_length)`` frames. :meth:`forward` trims its reconstruction back to the input
  length; :meth:`decode` returns ``frames * hop_length`` samples unless given ``length=`` (pass the
  original length to trim the padding).

* Bitrate: ``frame_rate * num_quantizers * log2(codebook_size) / 1000`` kbps with
  ``frame_rate = sample_rate / hop_length``. E.g. 24 kHz, ratios [8, 5, 4, 2] (hop 320, 75 Hz),
  1024 codes: 2 / 4 / 8 / 16 / 32 levels = 1.5 / 3 / 6 / 12 / 24 kbps. Training with quantizer dropout
  makes one model usable at all of them: pick the level count at :meth:`encode` time, or decode any
  prefix of a code tensor's levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torchaudio
from torch import Tensor, nn
from torch.nn import functional as F

from vqlib.residual import ResidualVQ
from vqlib.validation import check_finite

from .audio_blocks import SEANetDecoder, SEANetEncoder
from .hub import HubMixin


@dataclass
class AudioTokenizerOutput:
    """reconstruction (b, channels, time); codes (b, frames, num_quantizers) with -1 for levels not used
    in this pass (quantizer dropout / ``num_quantizers=``); quantizer_loss scalar; per-level metrics."""

    reconstruction: Tensor
    codes: Tensor
    quantizer_loss: Tensor
    num_quantizers: int
    metrics: dict[str, Tensor] = field(default_factory=dict)


def mix_channels(wave: Tensor, channels: int) -> Tensor:
    """Match the channel axis (-2) of ``wave`` to ``channels``: average into mono, duplicate mono into
    several channels; any other mismatch is a ValueError."""
    have = wave.shape[-2]
    if have == channels:
        return wave
    if channels == 1:
        return wave.mean(dim=-2, keepdim=True)
    if have == 1:
        return wave.expand(*wave.shape[:-2], channels, wave.shape[-1]).contiguous()
    raise ValueError(
        f"cannot map {have} input channels to {channels}: only averaging to mono and duplicating mono are defined"
    )


def resample(wave: Tensor, orig_sample_rate: int, new_sample_rate: int) -> Tensor:
    """Band-limited resampling along the last axis (torchaudio); identity when the rates agree."""
    if orig_sample_rate <= 0:
        raise ValueError(f"sample_rate: expected a positive integer, got {orig_sample_rate}")
    if int(orig_sample_rate) != orig_sample_rate:
        raise ValueError(f"sample_rate: expected an integer number of Hz, got {orig_sample_rate}")
    if orig_sample_rate == new_sample_rate:
        return wave
    return torchaudio.functional.resample(wave, int(orig_sample_rate), int(new_sample_rate))


class AudioTokenizer(HubMixin, nn.Module):
    """SEANet encoder -> :class:`vqlib.ResidualVQ` -> SEANet decoder, at one fixed sample rate.

    Args:
        quantizer: a :class:`vqlib.ResidualVQ` whose ``dim`` is the latent width (e.g.
            ``ResidualVQ(128, 1024, 32, quantizer_dropout=0.5, kmeans_init=True, channel_first=True)``).
        sample_rate: the model's sample rate in Hz; other rates go through :meth:`prepare`.
        channels: 1 (mono) or 2 (stereo).
        n_filters: width of the first conv; doubles after each downsampling.
        ratios: upsampling ratios of the decoder (the encoder downsamples in reverse order);
            ``hop_length = prod(ratios)`` samples per frame.
        residual_dilations: one residual unit per dilation before each downsampling (SoundStream's 1, 3, 9).
        lstm_layers: LSTM layers (with skip) at the bottleneck; 0 for none.
        causal: pad convolutions only on the left, so output never depends on future input (streaming).
        kernel_size: first/last conv kernel.
        norm: "weight_norm" (EnCodec) or "none".
    """

    def __init__(
        self,
        quantizer: ResidualVQ,
        *,
        sample_rate: int = 24000,
        channels: int = 1,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        residual_dilations: Sequence[int] = (1, 3, 9),
        lstm_layers: int = 2,
        causal: bool = False,
        kernel_size: int = 7,
        norm: str = "weight_norm",
    ):
        super().__init__()
        if not isinstance(quantizer, ResidualVQ):
            raise TypeError(f"quantizer: expected a vqlib.ResidualVQ, got {type(quantizer).__name__}")
        if channels not in (1, 2):
            raise ValueError(f"channels: expected 1 (mono) or 2 (stereo), got {channels}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate: expected a positive integer, got {sample_rate}")
        if n_filters < 1 or lstm_layers < 0:
            raise ValueError(f"expected n_filters >= 1 and lstm_layers >= 0, got {n_filters} and {lstm_layers}")
        ratios = [int(r) for r in ratios]
        residual_dilations = [int(d) for d in residual_dilations]
        self.init_args = dict(
            sample_rate=sample_rate, channels=channels, n_filters=n_filters, ratios=ratios,
            residual_dilations=residual_dilations, lstm_layers=lstm_layers, causal=causal,
            kernel_size=kernel_size, norm=norm,
        )  # fmt: skip
        self.sample_rate = int(sample_rate)
        self.channels = channels
        self.ratios = ratios
        self.hop_length = math.prod(ratios)
        arch = dict(channels=channels, dimension=quantizer.dim, n_filters=n_filters, ratios=ratios,
                    residual_dilations=residual_dilations, kernel_size=kernel_size, lstm_layers=lstm_layers,
                    causal=causal, norm=norm)  # fmt: skip
        self.encoder = SEANetEncoder(**arch)
        self.quantizer = quantizer
        self.decoder = SEANetDecoder(**arch)

    # -- hub ----------------------------------------------------------------------------------------------------
    def _hub_config(self) -> dict:
        return dict(self.init_args)

    def _model_card_fields(self) -> dict[str, str]:
        levels = sorted({n for n in (1, 2, 4, 8, 16, 32, self.num_quantizers) if n <= self.num_quantizers})
        table = ", ".join(f"{n} levels = {self.bitrate(n):g} kbps" for n in levels)
        return {
            "sample_rate": str(self.sample_rate),
            "frame_rate": f"{self.frame_rate:g}",
            "bitrates": table,
        }

    # -- sizes ----------------------------------------------------------------------------------------------------
    @property
    def num_quantizers(self) -> int:
        return self.quantizer.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def frame_rate(self) -> float:
        """Code frames per second: sample_rate / hop_length."""
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames for a clip of ``num_samples`` samples: ceil(num_samples / hop_length) (the tail is zero-padded)."""
        return math.ceil(num_samples / self.hop_length)

    def bitrate(self, num_quantizers: int | None = None) -> float:
        """kbps at ``num_quantizers`` levels (all when None): frame_rate * n * log2(codebook_size) / 1000."""
        n = self.num_quantizers if num_quantizers is None else self._check_num_quantizers(num_quantizers)
        return self.frame_rate * n * math.log2(self.codebook_size) / 1000.0

    def _check_num_quantizers(self, n: int | None) -> int:
        if n is None:
            return self.num_quantizers
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_quantizers:
            raise ValueError(f"num_quantizers: expected an int in [1, {self.num_quantizers}], got {n!r}")
        return n

    # -- input handling ---------------------------------------------------------------------------------------------
    def prepare(self, wave: Tensor, sample_rate: int) -> Tensor:
        """Any waveform -> (batch, channels, time) float at the model's rate (rules in the module docstring)."""
        if not isinstance(wave, Tensor):
            raise TypeError(f"wave: expected a torch.Tensor, got {type(wave).__name__} (use torch.from_numpy)")
        if not wave.is_floating_point():
            raise TypeError(
                f"wave: expected a floating point waveform in [-1, 1], got dtype {wave.dtype} "
                "(convert 16-bit PCM with x.float() / 32768)"
            )
        if wave.ndim == 1:
            wave = wave[None, None]
        elif wave.ndim == 2:
            wave = wave[None]
        elif wave.ndim != 3:
            raise ValueError(
                f"wave: expected (time,), (channels, time) or (batch, channels, time), got {tuple(wave.shape)}"
            )
        return resample(mix_channels(wave, self.channels), sample_rate, self.sample_rate)

    def _check_wave(self, wave: Tensor) -> None:
        if not isinstance(wave, Tensor):
            raise TypeError(f"wave: expected a torch.Tensor, got {type(wave).__name__}")
        if not wave.is_floating_point():
            raise TypeError(f"wave: expected a floating point tensor, got dtype {wave.dtype}")
        if wave.ndim != 3 or wave.shape[1] != self.channels or wave.shape[-1] < 1:
            raise ValueError(
                f"wave: expected shape (batch, {self.channels}, time) at {self.sample_rate} Hz, got "
                f"{tuple(wave.shape)}; use tokenizer.prepare(wave, sample_rate) to convert other layouts, "
                "channel counts and sample rates"
            )
        check_finite(wave, "wave")

    def _pad(self, wave: Tensor) -> Tensor:
        extra = -wave.shape[-1] % self.hop_length
        return F.pad(wave, (0, extra)) if extra else wave

    # -- model ------------------------------------------------------------------------------------------------------
    def forward(self, wave: Tensor, num_quantizers: int | None = None) -> AudioTokenizerOutput:
        """Encode, quantize (all levels, or the first ``num_quantizers``; in training the quantizer's dropout
        draws the count when None) and decode; the reconstruction has the input's length."""
        self._check_wave(wave)
        num_quantizers = None if num_quantizers is None else self._check_num_quantizers(num_quantizers)
        length = wave.shape[-1]
        out = self.quantizer.forward_channel_first(self.encoder(self._pad(wave)), num_quantizers=num_quantizers)
        reconstruction = self.decoder(out.quantized)[..., :length]
        used = int(out.metrics["num_quantizers"])  # levels run in this pass (ResidualVQ always reports it)
        return AudioTokenizerOutput(reconstruction, out.indices, out.loss, used, dict(out.metrics))

    @torch.no_grad()
    def encode(self, wave: Tensor, num_quantizers: int | None = None) -> Tensor:
        """Waveform (b, channels, time) at ``sample_rate`` -> int64 codes (b, ceil(time / hop_length), n)
        with n = ``num_quantizers`` (all levels when None). Runs in eval mode (no codebook updates)."""
        self._check_wave(wave)
        n = self._check_num_quantizers(num_quantizers)
        was_training = self.training
        self.eval()
        try:
            out = self.quantizer.forward_channel_first(self.encoder(self._pad(wave)), num_quantizers=n)
        finally:
            self.train(was_training)
        return out.indices[..., :n]

    def _check_codes(self, codes: Tensor) -> None:
        if not isinstance(codes, Tensor):
            raise TypeError(f"codes: expected a torch.Tensor, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes: expected an integer tensor, got dtype {codes.dtype}")
        if codes.ndim != 3 or not 1 <= codes.shape[-1] <= self.num_quantizers or codes.shape[1] < 1:
            raise ValueError(
                f"codes: expected shape (batch, frames, n) with 1 <= n <= {self.num_quantizers} levels "
                f"(as returned by encode), got {tuple(codes.shape)}"
            )
        if codes.numel() == 0:
            raise ValueError(f"codes: expected at least one batch item, got shape {tuple(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -1 or hi >= self.codebook_size:
            raise IndexError(
                f"codes: expected values in [0, {self.codebook_size - 1}] for codebooks of {self.codebook_size} "
                f"codes (-1 only for trailing unused levels), got min {lo} and max {hi}"
            )
        if (codes[..., 0] < 0).any():
            raise ValueError("codes: the first level must be present everywhere (got -1 in level 0)")

    def decode(self, codes: Tensor, length: int | None = None) -> Tensor:
        """Codes (b, frames, n), any prefix of levels, -> waveform (b, channels, frames * hop_length),
        trimmed to ``length`` samples when given (the original length before padding)."""
        self._check_codes(codes)
        full = codes.shape[1] * self.hop_length
        if length is not None and not (isinstance(length, int) and full - self.hop_length < length <= full):
            raise ValueError(
                f"length: expected an int in ({full - self.hop_length}, {full}] for {codes.shape[1]} frames "
                f"of {self.hop_length} samples, got {length!r}"
            )
        wave = self.decoder(self.quantizer.decode_channel_first(codes))
        return wave if length is None else wave[..., :length]


__all__ = ["AudioTokenizer", "AudioTokenizerOutput", "mix_channels", "resample"]
