"""Codebook usage of plain VQ vs the SimVQ reparameterisation at 65,536 codes on real photographs.

A small convolutional autoencoder (32x32 RGB crops -> 8x8 latent grid, 64 tokens per crop) is trained
with the same seed, data order, optimiser and step count once per quantizer:

    plain: vqlib.VectorQuantize(latent_dim, 65536)                          (EMA codebook, random init)
    simvq: vqlib.VectorQuantize(latent_dim, 65536, reparam="simvq", codebook_update="gradient")

Data: the real photographs shipped with scikit-image and scikit-learn (no network). Each image's bottom
20% of rows is held out; training crops come from the rest. Usage is the number of distinct codes the
trained model picks over a fixed held-out set of crops, divided by the codebook size. That set has
8 tokens per code by default (8192 crops x 64 tokens = 524,288), so a codebook whose codes really are
all reachable can show ~100% (uniform assignment would leave exp(-8) = 0.03% of codes unpicked),
while a codebook with dead or rarely reachable codes cannot reach 95%.

    python benchmarks/bench_utilization.py                    # default run, ~10 min on 2 cores
    python benchmarks/bench_utilization.py --steps 100 --variants simvq --eval-crops 2048   # quick look
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_description, setup_threads  # noqa: E402

# Real photographs only (no synthetic test patterns); grayscale ones are replicated to RGB.
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
    "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel", "cell", "clock",
)
HELD_OUT_FRACTION = 0.2
TARGET_USAGE = 0.95


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------
def load_photos() -> list[tuple[str, Tensor]]:
    """(name, float32 (3, H, W) in [0, 1]) for every bundled photograph."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in SKIMAGE_PHOTOS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            photos.append((name, getattr(skimage.data, name)()))
    sample = load_sample_images()
    photos += [(os.path.basename(f), im) for f, im in zip(sample.filenames, sample.images)]
    out = []
    for name, im in photos:
        t = torch.from_numpy(im.copy()).float() / 255.0
        t = t[None].expand(3, -1, -1) if t.ndim == 2 else t[..., :3].permute(2, 0, 1)
        out.append((name, t.contiguous()))
    return out


class CropSampler:
    """Random crops from one region (train: top rows, eval: bottom rows) of every photo, area-weighted."""

    def __init__(self, photos: list[tuple[str, Tensor]], crop: int, held_out: bool):
        self.crop, self.regions = crop, []
        for _, im in photos:
            h = im.shape[1]
            split = int(round(h * (1 - HELD_OUT_FRACTION)))
            region = im[:, split:] if held_out else im[:, :split]
            if region.shape[1] >= crop and region.shape[2] >= crop:
                self.regions.append(region)
        positions = torch.tensor(
            [(r.shape[1] - crop + 1) * (r.shape[2] - crop + 1) for r in self.regions], dtype=torch.float64
        )
        self.weights = positions / positions.sum()
        self.pixels = sum(r.shape[1] * r.shape[2] for r in self.regions)

    def sample(self, n: int, gen: torch.Generator, flip: bool) -> Tensor:
        which = torch.multinomial(self.weights, n, replacement=True, generator=gen).tolist()
        crops = []
        for i in which:
            r = self.regions[i]
            top = int(torch.randint(r.shape[1] - self.crop + 1, (1,), generator=gen))
            left = int(torch.randint(r.shape[2] - self.crop + 1, (1,), generator=gen))
            c = r[:, top : top + self.crop, left : left + self.crop]
            if flip and bool(torch.rand((), generator=gen) < 0.5):
                c = c.flip(-1)
            crops.append(c)
        return torch.stack(crops)


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
class Autoencoder(nn.Module):
    """Conv encoder (/4) -> channel-first quantizer over the latent grid -> conv decoder (x4)."""

    def __init__(self, quantizer: nn.Module, latent_dim: int, width: int = 64, latent_norm: str = "none"):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, latent_dim, 1),
            # Optional: centre and scale each latent channel over the batch, so the latents start
            # spread around the origin like the (zero-mean) codes instead of off to one side of them.
            nn.BatchNorm2d(latent_dim, affine=False) if latent_norm == "batchnorm" else nn.Identity(),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, 2 * width, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, vq_loss = self.quantizer(self.encoder(images))
        return self.decoder(quantized), indices, vq_loss


def make_quantizer(variant: str, args: argparse.Namespace) -> nn.Module:
    from vqlib import VectorQuantize

    common = dict(channel_first=True, gradient_estimator=args.estimator, seed=args.seed)
    if variant == "plain":
        return VectorQuantize(args.latent_dim, args.codebook_size, codebook_update="ema", **common)
    if variant == "simvq":
        return VectorQuantize(args.latent_dim, args.codebook_size, reparam="simvq", codebook_update="gradient", **common)
    raise ValueError(f"variant must be 'plain' or 'simvq', got {variant!r}")


# ---------------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------------
def train(variant: str, args: argparse.Namespace, train_data: CropSampler) -> tuple[Autoencoder, float]:
    torch.manual_seed(args.seed)  # same decoder/encoder init for every variant
    model = Autoencoder(make_quantizer(variant, args), args.latent_dim, args.width, args.latent_norm)
    codebook_params = [p for n, p in model.named_parameters() if n.startswith("quantizer.")]
    other_params = [p for n, p in model.named_parameters() if not n.startswith("quantizer.")]
    groups = [{"params": other_params, "lr": args.lr}]
    if codebook_params:
        groups.append({"params": codebook_params, "lr": args.lr * args.codebook_lr_mult})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(args.seed)  # same data order for every variant
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr_scale = min(1.0, step / max(1, args.warmup_steps))
        for g, base in zip(opt.param_groups, [args.lr, args.lr * args.codebook_lr_mult]):
            g["lr"] = base * lr_scale
        images = train_data.sample(args.batch, gen, flip=True)
        recon, indices, vq_loss = model(images)
        rec_loss = F.mse_loss(recon, images)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            used = indices.unique().numel()
            print(
                f"  [{variant}] step {step:5d}  recon mse {rec_loss.item():.5f}  vq loss {vq_loss.item():.4f}  "
                f"batch codes {used}/{indices.numel()}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    return model, time.perf_counter() - start


@torch.no_grad()
def evaluate(model: Autoencoder, eval_crops: Tensor, codebook_size: int, chunk: int = 512) -> dict[str, float]:
    model.eval()
    seen = torch.zeros(codebook_size, dtype=torch.bool)
    counts = torch.zeros(codebook_size, dtype=torch.long)
    sq_err, pixels = 0.0, 0
    for start in range(0, eval_crops.shape[0], chunk):
        images = eval_crops[start : start + chunk]
        recon, indices, _ = model(images)
        counts += torch.bincount(indices.reshape(-1), minlength=codebook_size)
        sq_err += (recon.clamp(0, 1) - images).pow(2).sum().item()
        pixels += images.numel()
    seen = counts > 0
    p = counts[seen].double() / counts.sum()
    mse = sq_err / pixels
    return {
        "usage": seen.float().mean().item(),
        "used": int(seen.sum()),
        "perplexity": math.exp(-(p * p.log()).sum().item()),
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / mse),
        "tokens": int(counts.sum()),
    }


def main(args: argparse.Namespace) -> None:
    setup_threads(args.threads)
    torch.manual_seed(args.seed)
    photos = load_photos()
    train_data = CropSampler(photos, args.crop, held_out=False)
    eval_data = CropSampler(photos, args.crop, held_out=True)
    eval_crops = eval_data.sample(args.eval_crops, torch.Generator().manual_seed(args.seed + 1), flip=False)
    tokens_per_crop = (args.crop // 4) ** 2
    eval_tokens = args.eval_crops * tokens_per_crop
    print(f"machine: {machine_description()}")
    print(
        f"data: {len(photos)} photographs ({len(train_data.regions)} train regions, {train_data.pixels / 1e6:.2f} Mpx; "
        f"held-out bottom {HELD_OUT_FRACTION:.0%}: {eval_data.pixels / 1e6:.2f} Mpx); crops {args.crop}x{args.crop} "
        f"-> {tokens_per_crop} tokens"
    )
    print(
        f"config: codebook {args.codebook_size}, latent dim {args.latent_dim}, width {args.width}, steps {args.steps}, "
        f"latent norm {args.latent_norm}, batch {args.batch} crops ({args.batch * tokens_per_crop} tokens), lr {args.lr} (codebook x{args.codebook_lr_mult}), "
        f"estimator {args.estimator}, seed {args.seed}"
    )
    ceiling = 1 - math.exp(-eval_tokens / args.codebook_size)
    print(
        f"eval: {args.eval_crops} held-out crops = {eval_tokens} tokens ({eval_tokens / args.codebook_size:.1f} per code; "
        f"uniform assignment would use {ceiling:.2%})"
    )
    results = {}
    for variant in args.variants:
        model, seconds = train(variant, args, train_data)
        results[variant] = dict(evaluate(model, eval_crops, args.codebook_size), train_s=seconds)
        r = results[variant]
        print(f"  [{variant}] eval usage {r['usage']:.2%} ({r['used']} codes), psnr {r['psnr']:.2f} dB", flush=True)

    print()
    print("| quantizer | codes used (held-out) | usage | perplexity | recon MSE | PSNR dB | train time s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['used']} / {args.codebook_size} | {r['usage']:.2%} | {r['perplexity']:.0f} | "
            f"{r['mse']:.5f} | {r['psnr']:.2f} | {r['train_s']:.0f} |"
        )
    if "simvq" in results:
        u = results["simvq"]["usage"]
        print(f"\ntarget simvq usage >= {TARGET_USAGE:.0%}: {'PASS' if u >= TARGET_USAGE else 'FAIL'} ({u:.2%})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["plain", "simvq"])
    p.add_argument("--codebook-size", type=int, default=65536)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--latent-norm", choices=["none", "batchnorm"], default="none")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-lr-mult", type=float, default=1.0, help="learning-rate factor for quantizer parameters")
    p.add_argument("--estimator", choices=["ste", "rotation"], default="ste")
    p.add_argument("--eval-crops", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.crop % 4:
        p.error(f"--crop must be a multiple of 4 (the encoder downsamples by 4), got {args.crop}")
    bad = set(args.variants) - {"plain", "simvq"}
    if bad:
        p.error(f"--variants: unknown {sorted(bad)}, expected plain and/or simvq")
    return args


if __name__ == "__main__":
    main(parse_args())
