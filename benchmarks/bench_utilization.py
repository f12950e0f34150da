"""Codebook usage of plain VQ vs the SimVQ reparameterisation at 65,536 codes on real photographs.

A small convolutional autoencoder (32x32 RGB crops -> 8x8 grid of 4-dim latents, f4) is trained with the
same seed, initial weights, data order, optimiser and step count once per quantizer:

    plain: vqlib.VectorQuantize(4, 65536)                               EMA codebook (decay 0.99), random init
    simvq: vqlib.VectorQuantize(4, 65536, reparam="simvq", codebook_update="gradient")

Both use the rotation-trick gradient estimator. The quantizer's own parameters (SimVQ's linear map; the
EMA codebook has none) get AdamW with a 30x learning rate and weight decay 1.0 (--codebook-lr-mult,
--codebook-weight-decay); SimVQ's map has a bias, as in the reference implementation. The README's
"Quantizer benchmarks" section gives the ablations (no weight decay, straight-through estimator).

Data: the real photographs shipped with scikit-image and scikit-learn (no network). The bottom 25% of
rows of every photo is held out and never trained on. Usage = distinct codes picked over the held-out
regions / codebook size. The regions are tokenised at all 16 offsets of the 4x4 token grid (every pixel
position is a token corner once) and in 4 mirrorings (none, horizontal, vertical, both): 6.5M tokens,
~99 per code. That is about half the ~195 tokens per code of the usual protocol (ImageNet val, 50k
images x 256 tokens, 65,536 codes), so a codebook with dead codes cannot reach 95%. The table also
gives usage over smaller subsets of the views (~1.5 to ~49 tokens per code) and the perplexity of the
code histogram.

    python benchmarks/bench_utilization.py                        # default run (both variants)
    python benchmarks/bench_utilization.py --variants simvq --steps 200   # quick look
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
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
)
HELD_OUT_FRACTION = 0.25
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

    def __init__(self, quantizer: nn.Module, latent_dim: int, width: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * width, latent_dim, 1),
        )
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1),
            nn.GELU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.GELU(),
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
        return VectorQuantize(
            args.latent_dim, args.codebook_size, reparam="simvq", codebook_update="gradient", **common
        )
    raise ValueError(f"variant must be 'plain' or 'simvq', got {variant!r}")


# ---------------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------------
def train(variant: str, args: argparse.Namespace, train_data: CropSampler) -> tuple[Autoencoder, float]:
    quantizer = make_quantizer(variant, args)
    torch.manual_seed(args.seed)  # same encoder/decoder init for every variant, whatever the quantizer drew
    model = Autoencoder(quantizer, args.latent_dim, args.width)
    codebook_params = [p for n, p in model.named_parameters() if n.startswith("quantizer.")]
    other_params = [p for n, p in model.named_parameters() if not n.startswith("quantizer.")]
    groups = [{"params": other_params, "lr": args.lr, "weight_decay": 0.0}]
    if codebook_params:
        groups.append(
            {
                "params": codebook_params,
                "lr": args.lr * args.codebook_lr_mult,
                "weight_decay": args.codebook_weight_decay,
            }
        )
    opt = torch.optim.AdamW(groups)
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


# Held-out views: every region at all 16 offsets of the 4x4 token grid, unflipped and mirrored
# (horizontally, vertically, both). Usage is reported cumulatively over growing subsets of the views so
# the table shows how it grows with the number of held-out tokens per code.
OFFSETS = [(dy, dx) for dy in range(4) for dx in range(4)]
FLIPS = ("none", "h", "v", "hv")
VIEW_SETS = {
    "1 offset": [("none", (0, 0))],
    "4 offsets": [("none", o) for o in [(0, 0), (0, 2), (2, 0), (2, 2)]],
    "16 offsets": [("none", o) for o in OFFSETS],
    "16 offsets x 2 flips": [(f, o) for f in FLIPS[:2] for o in OFFSETS],
    "16 offsets x 4 flips": [(f, o) for f in FLIPS for o in OFFSETS],
}


def _view(region: Tensor, flip: str, dy: int, dx: int) -> Tensor:
    if "h" in flip:
        region = region.flip(-1)
    if "v" in flip:
        region = region.flip(-2)
    h, w = (region.shape[1] - dy) // 4 * 4, (region.shape[2] - dx) // 4 * 4
    return region[None, :, dy : dy + h, dx : dx + w]


@torch.no_grad()
def evaluate(model: Autoencoder, regions: list[Tensor], codebook_size: int) -> dict:
    """Tokenise every held-out region in every view (16 grid offsets x 4 mirrorings); usage = distinct
    codes / codebook size over all views, also reported over growing subsets of them (VIEW_SETS).
    Reconstruction error is measured on the unflipped offset-(0, 0) view, clamped to [0, 1]."""
    model.eval()
    views = [(f, o) for f in FLIPS for o in OFFSETS]
    counts = {v: torch.zeros(codebook_size, dtype=torch.long) for v in views}
    sq_err, pixels = 0.0, 0
    for region in regions:
        for flip, (dy, dx) in views:
            images = _view(region, flip, dy, dx)
            quantized, indices, _ = model.quantizer(model.encoder(images))
            counts[flip, (dy, dx)] += torch.bincount(indices.reshape(-1), minlength=codebook_size)
            if (flip, dy, dx) == ("none", 0, 0):
                sq_err += (model.decoder(quantized).clamp(0, 1) - images).pow(2).sum().item()
                pixels += images.numel()
    total = sum(counts.values())
    used = total > 0
    p = total[used].double() / total.sum()
    mse = sq_err / pixels
    curve = {}
    for name, keys in VIEW_SETS.items():
        subset = sum(counts[k] for k in keys)
        curve[name] = ((subset > 0).float().mean().item(), subset.sum().item() / codebook_size)
    return {
        "usage": used.float().mean().item(),
        "used": int(used.sum()),
        "curve": curve,
        "perplexity": math.exp(-(p * p.log()).sum().item()),
        "mse": mse,
        "psnr": 10 * math.log10(1.0 / mse),
        "tokens": int(total.sum()),
    }


def main(args: argparse.Namespace) -> None:
    setup_threads(args.threads)
    torch.manual_seed(args.seed)
    photos = load_photos()
    train_data = CropSampler(photos, args.crop, held_out=False)
    eval_regions = CropSampler(photos, args.crop, held_out=True).regions
    eval_tokens = len(FLIPS) * sum(
        ((r.shape[1] - dy) // 4) * ((r.shape[2] - dx) // 4) for r in eval_regions for dy, dx in OFFSETS
    )
    tokens_per_crop = (args.crop // 4) ** 2
    print(f"machine: {machine_description()}")
    print(
        f"data: {len(photos)} photographs; train on the top {1 - HELD_OUT_FRACTION:.0%} of each "
        f"({train_data.pixels / 1e6:.2f} Mpx, random {args.crop}x{args.crop} crops with flips), "
        f"hold out the bottom {HELD_OUT_FRACTION:.0%} ({sum(r[0].numel() for r in eval_regions) / 1e6:.2f} Mpx)"
    )
    print(
        f"config: codebook {args.codebook_size}, latent dim {args.latent_dim}, width {args.width}, steps {args.steps}, "
        f"batch {args.batch} crops ({args.batch * tokens_per_crop} tokens), lr {args.lr} (codebook x{args.codebook_lr_mult}, "
        f"weight decay {args.codebook_weight_decay}), estimator {args.estimator}, seed {args.seed}"
    )
    per_code = eval_tokens / args.codebook_size
    print(
        f"eval: held-out regions tokenised at all 16 grid offsets x {len(FLIPS)} mirrorings = {eval_tokens} tokens "
        f"({per_code:.1f} per code; "
        f"a uniform assignment would use {1 - math.exp(-per_code):.2%} of the codes)"
    )
    results = {}
    for variant in args.variants:
        model, seconds = train(variant, args, train_data)
        start = time.perf_counter()
        results[variant] = dict(evaluate(model, eval_regions, args.codebook_size), train_s=seconds)
        r = results[variant]
        print(
            f"  [{variant}] held-out usage {r['usage']:.2%} ({r['used']} codes), psnr {r['psnr']:.2f} dB "
            f"(eval {time.perf_counter() - start:.0f}s)",
            flush=True,
        )

    print()
    print("| quantizer | codes used (held-out) | usage | perplexity | recon MSE | PSNR dB | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        print(
            f"| {variant} | {r['used']} / {args.codebook_size} | {r['usage']:.2%} | {r['perplexity']:.0f} | "
            f"{r['mse']:.5f} | {r['psnr']:.2f} | {r['train_s']:.0f} |"
        )
    print("\nusage vs held-out tokens per code (views: grid offsets x mirrorings):\n")
    print("| views | tokens per code | " + " | ".join(results) + " |")
    print("|---|---:|" + "---:|" * len(results))
    for name in VIEW_SETS:
        per_code = next(iter(results.values()))["curve"][name][1]
        cells = " | ".join(f"{r['curve'][name][0]:.2%}" for r in results.values())
        print(f"| {name} | {per_code:.1f} | {cells} |")
    if "simvq" in results:
        u = results["simvq"]["usage"]
        print(f"\ntarget simvq usage >= {TARGET_USAGE:.0%}: {'PASS' if u >= TARGET_USAGE else 'FAIL'} ({u:.2%})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["plain", "simvq"])
    p.add_argument("--codebook-size", type=int, default=65536)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--codebook-lr-mult", type=float, default=30.0, help="learning-rate factor for quantizer parameters")
    p.add_argument("--codebook-weight-decay", type=float, default=1.0, help="AdamW decay of quantizer parameters")
    p.add_argument("--estimator", choices=["ste", "rotation"], default="rotation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=400)
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
