"""Image losses: PatchGAN shapes, hinge values, taming's adaptive weight, delayed discriminator start,
and LPIPS only from local safetensors files (random weights here: the maths and loading, not the quality)."""

import pytest
import torch
from safetensors.torch import save_file
from vqlib.models.image_losses import (
    LPIPS,
    ImageTokenizerLoss,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)


@pytest.mark.parametrize("norm,spectral", [("batch", False), ("group", False), ("none", True)])
def test_patchgan_gives_one_logit_per_patch(norm, spectral):
    d = NLayerDiscriminator(ndf=8, n_layers=3, norm=norm, spectral_norm=spectral)
    out = d(torch.randn(2, 3, 64, 64))
    # 3 stride-2 convs (64 -> 8) then two 4x4 stride-1 convs with padding 1 (8 -> 7 -> 6)
    assert out.shape == (2, 1, 6, 6)
    assert any("parametrizations" in n for n, _ in d.named_parameters()) == spectral
    d(torch.randn(1, 3, 24, 24))  # the smallest input 3 layers accept
    with pytest.raises(ValueError, match="at least 24x24, got \\(16, 16\\); lower disc_layers"):
        d(torch.randn(1, 3, 16, 16))


def test_hinge_and_vanilla_values():
    big = torch.full((4,), 2.0)
    assert hinge_d_loss(big, -big) == 0  # confident and correct: no loss
    zero = torch.zeros(4)
    assert hinge_d_loss(zero, zero) == pytest.approx(1.0)
    assert vanilla_d_loss(zero, zero) == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (3 * w).sum()  # grad (3, 3)
    g = (w**2).sum()  # grad (2, 4)
    expected = torch.tensor([3.0, 3.0]).norm() / (torch.tensor([2.0, 4.0]).norm() + 1e-4)
    assert adaptive_weight(rec, g, w) == pytest.approx(expected.item())


def test_discriminator_starts_late():
    loss = ImageTokenizerLoss(disc_weight=0.5, disc_start=5, disc_ndf=8, disc_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    w = torch.nn.Parameter(torch.ones(1))
    rec = torch.tanh(x * w * 0.5)
    q_loss = torch.tensor(0.3)
    early, logs = loss.generator_loss(x, rec, q_loss, step=4, last_layer=w)
    assert "g_loss" not in logs
    assert early.item() == pytest.approx((rec - x).abs().mean().item() + 0.3, rel=1e-6)
    with pytest.raises(RuntimeError, match="before disc_start=5"):
        loss.discriminator_loss(x, rec, step=4)
    late, logs = loss.generator_loss(x, rec, q_loss, step=5, last_layer=w)
    assert "g_loss" in logs and logs["disc_weight"] > 0
    assert late.item() == pytest.approx(early.item() + (logs["disc_weight"] * logs["g_loss"]).item(), rel=1e-5)
    d_loss, d_logs = loss.discriminator_loss(x, rec, step=5)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert w.grad is None  # the discriminator loss never reaches the generator


def test_no_discriminator_when_weight_is_zero():
    loss = ImageTokenizerLoss(disc_weight=0.0, recon_loss="l2")
    assert loss.discriminator is None and not loss.discriminator_active(10**9)
    x, rec = torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert loss.reconstruction_loss(x, rec) == 1.0


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="recon_loss"):
        ImageTokenizerLoss(recon_loss="l3")
    with pytest.raises(ValueError, match="disc_start must be >= 0"):
        ImageTokenizerLoss(disc_start=-1)


def write_random_lpips(folder, seed=0, bad_keys=False):
    torch.manual_seed(seed)
    model = LPIPS()
    save_file({f"features.{k}": v for k, v in model.features.state_dict().items()}, folder / "vgg16.safetensors")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS.CHANNELS)}
    if bad_keys:
        lins["extra"] = torch.zeros(1)
    save_file(lins, folder / "lpips_vgg.safetensors")


def test_lpips_unavailable_without_local_weights(tmp_path):
    with pytest.raises(ValueError, match="needs lpips_path.*never downloads"):
        ImageTokenizerLoss(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError, match="LPIPS is unavailable.*lacks vgg16.safetensors, lpips_vgg.safetensors"):
        ImageTokenizerLoss(perceptual_weight=1.0, lpips_path=str(tmp_path))


def test_lpips_from_local_files(tmp_path):
    write_random_lpips(tmp_path)
    lpips = LPIPS.from_folder(tmp_path)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(a, a), torch.zeros(2))
    d_ab = lpips(a, b)
    assert d_ab.shape == (2,) and (d_ab > 0).all()
    assert torch.allclose(d_ab, lpips(b, a), rtol=1e-5)
    assert not any(p.requires_grad for p in lpips.parameters())
    loss = ImageTokenizerLoss(perceptual_weight=1.0, lpips_path=str(tmp_path), disc_weight=0.0)
    rec = b.clone().requires_grad_(True)
    total, logs = loss.generator_loss(a, rec, torch.tensor(0.0), step=0)
    assert logs["perceptual_loss"] > 0
    total.backward()
    assert rec.grad.abs().sum() > 0  # LPIPS is frozen but passes gradients to the reconstruction
    (tmp_path / "lpips_vgg.safetensors").unlink()
    write_random_lpips(tmp_path, bad_keys=True)
    with pytest.raises(ValueError, match="expected keys"):
        LPIPS.from_folder(tmp_path)
