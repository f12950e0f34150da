"""Image tokenizer losses: L1/L2 reconstruction, optional LPIPS, PatchGAN discriminator with hinge loss,
taming's adaptive generator weight and a delayed discriminator start.

LPIPS is optional and never downloaded: pass ``lpips_path``, a folder holding ``vgg16.safetensors``
(torchvision VGG16 state dict; only ``features.*`` is used) and ``lpips_vgg.safetensors`` (the LPIPS v0.1
linear layers, keys ``lin0.model.1.weight`` ... ``lin4.model.1.weight``). Convert the usual ``.pth`` files once
with ``safetensors.torch.save_file(torch.load(path, weights_only=True), out)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from vqlib.validation import check_choice

NormKind = Literal["batch", "group", "none"]
ReconLoss = Literal["l1", "l2"]
DiscLoss = Literal["hinge", "vanilla"]

LPIPS_VGG_FILE = "vgg16.safetensors"
LPIPS_LIN_FILE = "lpips_vgg.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming): ``n_layers`` stride-2 convs, one logit per patch."""

    def __init__(
        self,
        in_channels: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        norm: NormKind = "batch",
        spectral_norm: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        check_choice("norm", norm, NormKind)
        self.n_layers = n_layers
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c // 4) or 1, c)
            return nn.Identity()

        use_bias = norm == "none"
        layers: list[nn.Module] = [wrap(nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                wrap(nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias)),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(wrap(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)))
        self.main = nn.Sequential(*layers)
        # n_layers halvings, then two 4x4 stride-1 convs that each remove one pixel.
        self.min_input_size = 3 * 2**n_layers
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"discriminator with {self.n_layers} layers needs images of at least {self.min_input_size}x"
                f"{self.min_input_size}, got {tuple(x.shape[-2:])}; lower disc_layers"
            )
        return self.main(x)


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
        nn.init.normal_(weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's ratio ||d rec / d W_last|| / ||d g / d W_last||: balances the GAN term against reconstruction."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grads.norm() / (g_grads.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------------------
# LPIPS (weights only from local safetensors files)
# ---------------------------------------------------------------------------------------------------------------
class LPIPS(nn.Module):
    """LPIPS (VGG16 variant, v0.1): learned perceptual distance, inputs in [-1, 1]. Frozen."""

    # Last layer index (inclusive) of each VGG16 ``features`` slice: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    SLICE_ENDS = (3, 8, 15, 22, 29)
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # Only the convolutional trunk up to relu5_3 (building the full VGG16 would allocate 138M parameters).
        self.features = make_layers(cfgs["D"])[: self.SLICE_ENDS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_folder(cls, folder: str | Path) -> LPIPS:
        folder = Path(folder)
        files = [folder / LPIPS_VGG_FILE, folder / LPIPS_LIN_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"LPIPS is unavailable: {folder} lacks {', '.join(missing)}. vqlib never downloads weights; put "
                f"{LPIPS_VGG_FILE} (torchvision VGG16 state dict) and {LPIPS_LIN_FILE} (LPIPS v0.1 'vgg' linear "
                "layers) there as safetensors, or set perceptual_weight: 0"
            )
        model = cls()
        vgg = {k[len("features.") :]: v for k, v in load_file(str(files[0])).items() if k.startswith("features.")}
        vgg = {k: v for k, v in vgg.items() if int(k.split(".")[0]) <= cls.SLICE_ENDS[-1]}
        model.features.load_state_dict(vgg, strict=True)
        lin = load_file(str(files[1]))
        expected = {f"lin{i}.model.1.weight" for i in range(len(cls.CHANNELS))}
        if set(lin) != expected:
            raise ValueError(f"{files[1]}: expected keys {sorted(expected)}, got {sorted(lin)}")
        for i, conv in enumerate(model.lins):
            conv.weight.copy_(lin[f"lin{i}.model.1.weight"])
        return model

    def train(self, mode: bool = True) -> LPIPS:  # always frozen in eval mode
        return super().train(False)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-image distance, shape (batch,)."""
        h = torch.cat([a, b]).sub(self.shift).div(self.scale)
        total = 0.0
        start = 0
        for end, lin in zip(self.SLICE_ENDS, self.lins):
            h = self.features[start : end + 1](h)
            start = end + 1
            fa, fb = h.chunk(2)
            diff = (_unit(fa) - _unit(fb)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total  # type: ignore[return-value]


def _unit(x: Tensor) -> Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Combined loss
# ---------------------------------------------------------------------------------------------------------------
class ImageTokenizerLoss(nn.Module):
    """Generator and discriminator objectives for an image tokenizer.

    generator = recon_weight * L1/L2 + perceptual_weight * LPIPS + quantizer_weight * quantizer loss
                + [step >= disc_start] * disc_factor * w * (-D(reconstruction))
    with w = disc_weight * adaptive ratio (``adaptive_weight=True``) or ``disc_weight``.
    discriminator = [step >= disc_start] * disc_factor * hinge (or vanilla) loss on real vs reconstructed.
    ``disc_weight: 0`` removes the discriminator entirely.
    """

    def __init__(
        self,
        *,
        recon_loss: ReconLoss = "l1",
        recon_weight: float = 1.0,
        quantizer_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        lpips_path: str | None = None,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_start: int = 0,
        adaptive_disc_weight: bool = True,
        disc_loss: DiscLoss = "hinge",
        disc_ndf: int = 64,
        disc_layers: int = 3,
        disc_norm: NormKind = "batch",
        disc_spectral_norm: bool = False,
        in_channels: int = 3,
    ):
        super().__init__()
        check_choice("recon_loss", recon_loss, ReconLoss)
        check_choice("disc_loss", disc_loss, DiscLoss)
        for name, value in (("recon_weight", recon_weight), ("quantizer_weight", quantizer_weight),
                            ("perceptual_weight", perceptual_weight), ("disc_weight", disc_weight),
                            ("disc_factor", disc_factor), ("disc_start", disc_start)):  # fmt: skip
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.recon_loss, self.recon_weight, self.quantizer_weight = recon_loss, recon_weight, quantizer_weight
        self.perceptual_weight = perceptual_weight
        self.disc_weight, self.disc_factor, self.disc_start = disc_weight, disc_factor, disc_start
        self.adaptive_disc_weight = adaptive_disc_weight
        self.d_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.perceptual: LPIPS | None = None
        if perceptual_weight > 0:
            if lpips_path is None:
                raise ValueError(
                    "perceptual_weight > 0 needs lpips_path, a local folder with LPIPS weights "
                    f"({LPIPS_VGG_FILE}, {LPIPS_LIN_FILE}); vqlib never downloads them"
                )
            self.perceptual = LPIPS.from_folder(lpips_path)
        self.discriminator = (
            NLayerDiscriminator(in_channels, disc_ndf, disc_layers, disc_norm, disc_spectral_norm)
            if disc_weight > 0 and disc_factor > 0
            else None
        )

    def discriminator_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def reconstruction_loss(self, images: Tensor, reconstruction: Tensor) -> Tensor:
        if self.recon_loss == "l1":
            return F.l1_loss(reconstruction, images)
        return F.mse_loss(reconstruction, images)

    def generator_loss(
        self,
        images: Tensor,
        reconstruction: Tensor,
        quantizer_loss: Tensor,
        step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        rec = self.reconstruction_loss(images, reconstruction)
        nll = self.recon_weight * rec
        logs = {"rec_loss": rec.detach()}
        if self.perceptual is not None:
            p = self.perceptual(images.contiguous(), reconstruction.contiguous()).mean()
            nll = nll + self.perceptual_weight * p
            logs["perceptual_loss"] = p.detach()
        loss = nll + self.quantizer_weight * quantizer_loss
        logs["quantizer_loss"] = quantizer_loss.detach()
        if self.discriminator_active(step):
            assert self.discriminator is not None
            g_loss = -self.discriminator(reconstruction.contiguous()).mean()
            weight = torch.tensor(self.disc_weight, device=images.device)
            if self.adaptive_disc_weight and last_layer is not None and torch.is_grad_enabled():
                weight = weight * adaptive_weight(nll, g_loss, last_layer)
            loss = loss + self.disc_factor * weight * g_loss
            logs.update(g_loss=g_loss.detach(), disc_weight=weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.discriminator_active(step):
            raise RuntimeError(f"discriminator_loss called at step {step}, before disc_start={self.disc_start}")
        assert self.discriminator is not None
        logits_real = self.discriminator(images.contiguous().detach())
        logits_fake = self.discriminator(reconstruction.contiguous().detach())
        d_loss = self.disc_factor * self.d_loss_fn(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


__all__ = [
    "LPIPS",
    "ImageTokenizerLoss",
    "NLayerDiscriminator",
    "adaptive_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
]
