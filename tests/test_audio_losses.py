import math

import pytest
import torch
from vqlib.models.audio_losses import (
    CombinedDiscriminator,
    MultiPeriodDiscriminator,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    si_sdr,
)


def sines(batch: int, length: int, sample_rate: int = 8000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    freqs = 100 + 1500 * torch.rand(batch, 1, 1, generator=g)
    t = torch.arange(length) / sample_rate
    return 0.5 * torch.sin(2 * math.pi * freqs * t)


def small_mel(sample_rate: int = 8000) -> MultiScaleMelLoss:
    return MultiScaleMelLoss(sample_rate, window_lengths=(64, 128, 256), n_mels=(10, 20, 40))


def test_mel_loss_zero_for_identical_and_grows_with_distortion():
    mel = small_mel()
    x = sines(2, 2000)
    assert mel(x, x).item() == 0.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    losses = [mel(x + a * noise, x).item() for a in (0.001, 0.01, 0.1)]
    assert 0 < losses[0] < losses[1] < losses[2]


def test_mel_loss_gradient_and_stereo():
    mel = small_mel()
    x = sines(2, 1000).repeat(1, 2, 1)  # stereo
    est = (x + 0.05 * torch.randn_like(x)).requires_grad_()
    mel(est, x).backward()
    assert est.grad is not None and est.grad.abs().sum() > 0


def test_mel_loss_argument_errors():
    with pytest.raises(ValueError, match="n_mels"):
        MultiScaleMelLoss(8000, window_lengths=(64, 128), n_mels=(10, 20, 40))
    mel = small_mel()
    with pytest.raises(ValueError, match="same shape"):
        mel(torch.zeros(1, 1, 500), torch.zeros(1, 1, 600))
    with pytest.raises(ValueError, match=r"\(batch, channels, time\)"):
        mel(torch.zeros(500), torch.zeros(500))


def test_si_sdr_known_value_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 1, 4000, generator=g)
    noise = torch.randn(3, 1, 4000, generator=g)
    ref, noise = ref - ref.mean(-1, keepdim=True), noise - noise.mean(-1, keepdim=True)
    # make the noise orthogonal to the reference, at 10 dB below it
    noise = noise - (noise * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True) * ref
    noise = noise * (ref.pow(2).sum(-1, keepdim=True) / noise.pow(2).sum(-1, keepdim=True) / 10).sqrt()
    est = ref + noise
    value = si_sdr(est, ref)
    assert value.shape == (3,)
    assert torch.allclose(value, torch.full((3,), 10.0), atol=1e-4)
    assert torch.allclose(si_sdr(3.0 * est + 0.2, ref), value, atol=1e-4)  # scale and offset invariant
    assert (si_sdr(ref + 3 * noise, ref) < value).all()
    assert (si_sdr(ref, ref) > 100).all()


def test_si_sdr_stereo_averages_channels():
    ref = sines(2, 2000).repeat(1, 2, 1)
    est = ref.clone()
    est[:, 1] += 0.1 * torch.randn(2, 2000)
    per_channel = torch.stack([si_sdr(est[:, c : c + 1], ref[:, c : c + 1]) for c in range(2)], dim=-1)
    assert torch.allclose(si_sdr(est, ref), per_channel.mean(-1), rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 2])
def test_discriminator_outputs(channels):
    x = torch.randn(2, channels, 1001)  # not a multiple of any period: MPD pads
    stft = MultiScaleSTFTDiscriminator(channels, n_ffts=(256, 128), filters=4)
    mpd = MultiPeriodDiscriminator(channels, periods=(2, 3, 5), widths=(4, 8, 8))
    both = CombinedDiscriminator([stft, mpd])
    outs = both(x)
    assert len(outs) == 2 + 3
    for logits, fmaps in outs:
        assert logits.shape[0] == 2 and logits.shape[1] == 1
        assert len(fmaps) >= 3 and all(f.shape[0] == 2 for f in fmaps)
    # the period discriminator folds time by its period: last axis of its logits is the period
    assert [o[0].shape[-1] for o in outs[2:]] == [2, 3, 5]
    with pytest.raises(ValueError, match="n_fft=256"):
        stft(torch.randn(1, channels, 100))


def test_adversarial_loss_values():
    confident = [(torch.full((2, 1, 4, 4), 2.0), []), (torch.full((2, 1, 3), 1.5), [])]
    fooled = [(torch.full((2, 1, 4, 4), -2.0), []), (torch.full((2, 1, 3), -1.5), [])]
    assert discriminator_loss(confident, fooled, "hinge").item() == 0.0
    assert discriminator_loss(fooled, confident, "hinge").item() == pytest.approx((3 + 3 + 2.5 + 2.5) / 2)
    assert generator_adversarial_loss(fooled, "hinge").item() == pytest.approx((3 + 2.5) / 2)
    assert generator_adversarial_loss(confident, "hinge").item() == 0.0
    ones = [(torch.ones(2, 1, 5), [])]
    zeros = [(torch.zeros(2, 1, 5), [])]
    assert discriminator_loss(ones, zeros, "least_squares").item() == 0.0
    assert generator_adversarial_loss(zeros, "least_squares").item() == 1.0
    with pytest.raises(ValueError, match="hinge"):
        discriminator_loss(ones, zeros, "wasserstein")


def test_feature_matching_relative_and_detached():
    real_maps = [torch.full((2, 3), 2.0), torch.full((2, 4), 10.0)]
    fake_maps = [(m + 1.0).requires_grad_() for m in real_maps]
    real = [(torch.zeros(1), [m.requires_grad_() for m in real_maps])]
    fake = [(torch.zeros(1), fake_maps)]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx((1 / 2 + 1 / 10) / 2)
    loss.backward()
    assert all(m.grad is not None for m in fake_maps)
    assert all(m.grad is None for m in real_maps)
    assert feature_matching_loss(real, real).item() == 0.0


def test_discriminator_learns_to_separate_tones_from_noise():
    torch.manual_seed(0)
    disc = CombinedDiscriminator(
        [
            MultiScaleSTFTDiscriminator(1, n_ffts=(128,), filters=4),
            MultiPeriodDiscriminator(1, periods=(2, 3), widths=(4, 8)),
        ]
    )
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    real, fake = sines(4, 1024, seed=1), 0.3 * torch.randn(4, 1, 1024)
    first = None
    for _ in range(30):
        loss = discriminator_loss(disc(real), disc(fake), "hinge")
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = discriminator_loss(disc(real), disc(fake), "hinge").item()
    assert final < 0.5 * first
