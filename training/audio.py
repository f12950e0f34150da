"""Training an :class:`~vqlib.models.AudioTokenizer` (EnCodec / DAC recipe) with Lightning.

Generator loss = ``mel_weight * multi-scale log-mel L1 + waveform_weight * L1 + quantizer_weight * RVQ loss``
plus, from ``disc_start_step`` on, ``adversarial_weight * G adversarial + feature_weight * feature matching``
against a multi-scale STFT discriminator and/or a multi-period discriminator. Generator and discriminator
have their own Adam optimisers, stepped by hand (manual optimisation).

Steps: ``trainer.global_step`` (and so ``max_steps``, ``disc_start_step``, checkpoint names) counts
*generator* steps, i.e. batches; the discriminator's steps are not counted.

Every validation logs, for each level count in ``eval_num_quantizers`` (default: a quarter of the levels
and all of them), ``val/mel_distance_nq{n}``, ``val/si_sdr_nq{n}`` (dB) and ``val/bitrate_kbps_nq{n}``;
``val/mel_distance`` and ``val/si_sdr`` at all levels; codebook usage and perplexity per RVQ level over
the whole validation set (``val/usage_level{i}``, ``val/perplexity_level{i}``); and writes the first
``num_audio_examples`` validation clips and their reconstructions at every evaluated level count as
``<log_dir>/audio/step_<global_step>/example<k>_{original,nq<n>}.wav``.

Codebook EMA state lives in the tokenizer's buffers, so Lightning checkpoints (``--ckpt_path`` to resume)
restore it exactly, along with both optimisers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn import functional as F
from vqlib.models.audio_losses import (
    AdversarialLoss,
    CombinedDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    si_sdr,
)
from vqlib.models.audio_tokenizer import AudioTokenizer

from vqlib.validation import check_choice

from .audio_data import AudioFolderDataModule, SynthAudioDataModule, SynthAudioDataset
from .common import log_folder, step_without_counting, weight_decay_groups
from .metrics import CodebookUsageTracker


def _write_wav(path: Path, wave: Tensor, sample_rate: int) -> None:
    """16-bit WAV, clipped to [-1, 1]; written under a temporary name and renamed (never half-written)."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    data = wave.detach().float().clamp(-1, 1).cpu().numpy().T
    sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


class AudioTokenizerModule(LightningModule):
    """GAN training of an AudioTokenizer; see the module docstring for losses, steps and logged metrics.

    Args:
        tokenizer: the model; exported by ``vqlib-train export`` through ``module.tokenizer.save_pretrained``.
        lr, disc_lr, betas: Adam settings of generator and discriminator.
        weight_decay: AdamW decoupled weight decay of both, on parameters of 2+ dimensions only (0 = Adam).
        mel_weight, waveform_weight, quantizer_weight, adversarial_weight, feature_weight: loss weights (DAC's
            15 / 0 / 1 / 1 / 2 by default).
        adversarial_loss: "hinge" (EnCodec) or "least_squares" (HiFi-GAN / DAC).
        disc_start_step: generator steps before discriminators train and the adversarial terms switch on.
        stft_discriminator_ffts: FFT sizes of the MS-STFT discriminator (empty: none); stft_filters: its width.
        mpd_periods: periods of the multi-period discriminator (empty: none); mpd_widths: its conv widths.
        mel_windows, mel_bands: window lengths and mel bands per scale of the mel loss and mel distance.
        grad_clip, disc_grad_clip: max gradient norms (0 = no clipping).
        eval_num_quantizers: level counts evaluated each validation (default: max(1, n/4) and n).
        num_audio_examples: validation clips written as WAV each validation (0: none).
    """

    def __init__(
        self,
        tokenizer: AudioTokenizer,
        *,
        lr: float = 3e-4,
        disc_lr: float = 3e-4,
        betas: tuple[float, float] = (0.8, 0.99),
        weight_decay: float = 0.0,
        mel_weight: float = 15.0,
        waveform_weight: float = 0.0,
        quantizer_weight: float = 1.0,
        adversarial_weight: float = 1.0,
        feature_weight: float = 2.0,
        adversarial_loss: AdversarialLoss = "hinge",
        disc_start_step: int = 0,
        stft_discriminator_ffts: Sequence[int] = (1024, 2048, 512),
        stft_filters: int = 32,
        mpd_periods: Sequence[int] = (2, 3, 5, 7, 11),
        mpd_widths: Sequence[int] = (32, 128, 512, 1024, 1024),
        mel_windows: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
        mel_bands: Sequence[int] = (5, 10, 20, 40, 80, 160, 320),
        grad_clip: float = 1000.0,
        disc_grad_clip: float = 10.0,
        eval_num_quantizers: Sequence[int] | None = None,
        num_audio_examples: int = 2,
    ):
        super().__init__()
        if not isinstance(tokenizer, AudioTokenizer):
            raise TypeError(f"tokenizer: expected a vqlib.models.AudioTokenizer, got {type(tokenizer).__name__}")
        check_choice("adversarial_loss", adversarial_loss, AdversarialLoss)
        self.save_hyperparameters(ignore=["tokenizer"])
        self.automatic_optimization = False
        self.tokenizer = tokenizer
        self.mel_loss = MultiScaleMelLoss(tokenizer.sample_rate, mel_windows, list(mel_bands))
        discriminators = []
        if stft_discriminator_ffts:
            discriminators.append(
                MultiScaleSTFTDiscriminator(tokenizer.channels, stft_discriminator_ffts, stft_filters)
            )
        if mpd_periods:
            discriminators.append(MultiPeriodDiscriminator(tokenizer.channels, mpd_periods, mpd_widths))
        self.discriminator = CombinedDiscriminator(discriminators) if discriminators else None
        n = tokenizer.num_quantizers
        levels = sorted(set(eval_num_quantizers)) if eval_num_quantizers else sorted({max(1, n // 4), n})
        for k in levels:
            if not 1 <= k <= n:
                raise ValueError(f"eval_num_quantizers: expected values in [1, {n}], got {k}")
        self.eval_levels = levels
        self._usage = CodebookUsageTracker(tokenizer.codebook_size, n)
        self._examples: dict[str, Tensor] = {}

    # -- setup ------------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr in ("sample_rate", "channels"):
            want, got = getattr(self.tokenizer, attr), getattr(dm, attr, None)
            if got is not None and got != want:
                raise ValueError(
                    f"data {attr} ({got}) differs from the tokenizer's ({want}); set data.init_args.{attr}: {want}"
                )

    def configure_optimizers(self):
        hp = self.hparams

        def adam(params, lr):
            return torch.optim.AdamW(weight_decay_groups(params, hp.weight_decay), lr=lr, betas=tuple(hp.betas))

        opt_g = adam(self.tokenizer.parameters(), hp.lr)
        if self.discriminator is None:
            return opt_g
        return [opt_g, adam(self.discriminator.parameters(), hp.disc_lr)]

    # -- training -----------------------------------------------------------------------------------------------------
    def _check_batch(self, wave: Tensor) -> Tensor:
        if wave.ndim != 3 or wave.shape[1] != self.tokenizer.channels:
            raise ValueError(f"batch: expected (batch, {self.tokenizer.channels}, time), got {tuple(wave.shape)}")
        return wave

    def _clip(self, optimizer, value: float) -> None:
        if value > 0:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm="norm")

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        hp = self.hparams
        wave = self._check_batch(batch)
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        adversarial = self.discriminator is not None and self.global_step >= hp.disc_start_step

        out = self.tokenizer(wave)
        mel = self.mel_loss(out.reconstruction, wave)
        loss_g = hp.mel_weight * mel + hp.quantizer_weight * out.quantizer_loss
        logs = {"train/mel": mel.detach(), "train/quantizer_loss": out.quantizer_loss.detach(),
                "train/num_quantizers": float(out.num_quantizers)}  # fmt: skip
        if hp.waveform_weight > 0:
            l1 = F.l1_loss(out.reconstruction, wave)
            loss_g = loss_g + hp.waveform_weight * l1
            logs["train/waveform_l1"] = l1.detach()
        if adversarial:
            self.toggle_optimizer(opt_g)  # discriminator parameters get no gradient from this backward
            fake = self.discriminator(out.reconstruction)
            with torch.no_grad():
                real = self.discriminator(wave)
            adv = generator_adversarial_loss(fake, hp.adversarial_loss)
            fm = feature_matching_loss(real, fake)
            loss_g = loss_g + hp.adversarial_weight * adv + hp.feature_weight * fm
            logs.update({"train/adversarial_g": adv.detach(), "train/feature_matching": fm.detach()})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip(opt_g, hp.grad_clip)
        opt_g.step()
        if adversarial:
            self.untoggle_optimizer(opt_g)
            self.toggle_optimizer(opt_d)
            loss_d = discriminator_loss(
                self.discriminator(wave), self.discriminator(out.reconstruction.detach()), hp.adversarial_loss
            )
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip(opt_d, hp.disc_grad_clip)
            step_without_counting(opt_d)
            self.untoggle_optimizer(opt_d)
            logs["train/loss_d"] = loss_d.detach()
        logs["train/loss_g"] = loss_g.detach()
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=wave.shape[0])
        self.log("mel", mel.detach(), prog_bar=True, logger=False, batch_size=wave.shape[0])

    # -- validation ---------------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._usage.reset()
        self._examples = {}

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        wave = self._check_batch(batch)
        b = wave.shape[0]
        keep = max(0, self.hparams.num_audio_examples - (self._examples["original"].shape[0] if self._examples else 0))
        if keep:
            self._append_example("original", wave[:keep])
        for n in self.eval_levels:
            out = self.tokenizer(wave, num_quantizers=n)
            mel = self.mel_loss(out.reconstruction, wave)
            sdr = si_sdr(out.reconstruction, wave).mean()
            full = n == self.tokenizer.num_quantizers
            self.log(f"val/mel_distance_nq{n}", mel, sync_dist=True, batch_size=b, prog_bar=full)
            self.log(f"val/si_sdr_nq{n}", sdr, sync_dist=True, batch_size=b, prog_bar=full)
            if full:
                self.log("val/mel_distance", mel, sync_dist=True, batch_size=b)
                self.log("val/si_sdr", sdr, sync_dist=True, batch_size=b)
                self._usage.update(out.codes, has_level_axis=True)
            if keep:
                self._append_example(f"nq{n}", out.reconstruction[:keep])
        if self.tokenizer.num_quantizers not in self.eval_levels:
            self._usage.update(self.tokenizer.encode(wave), has_level_axis=True)

    def _append_example(self, key: str, wave: Tensor) -> None:
        wave = wave.detach().cpu()
        self._examples[key] = torch.cat([self._examples[key], wave]) if key in self._examples else wave

    def on_validation_epoch_end(self) -> None:
        for n in self.eval_levels:
            self.log(f"val/bitrate_kbps_nq{n}", self.tokenizer.bitrate(n), sync_dist=False)
        stats = self._usage.compute(device=self.device)
        for i, (u, p) in enumerate(zip(stats["usage"].tolist(), stats["perplexity"].tolist())):
            self.log(f"val/usage_level{i}", u)
            self.log(f"val/perplexity_level{i}", p)
        self.log("val/usage_mean", float(stats["usage"].mean()))
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._write_examples()

    def audio_dir(self) -> Path:
        """Where reconstructions go: ``<logger.log_dir>/audio`` (the metrics' folder), else the trainer's root."""
        return log_folder(self) / "audio"

    def _write_examples(self) -> None:
        if not self._examples:
            return
        folder = self.audio_dir() / f"step_{self.global_step:07d}"
        sr = self.tokenizer.sample_rate
        for key, waves in self._examples.items():
            for k, w in enumerate(waves):
                _write_wav(folder / f"example{k}_{key}.wav", w, sr)


__all__ = ["AudioFolderDataModule", "AudioTokenizerModule", "SynthAudioDataModule", "SynthAudioDataset"]
