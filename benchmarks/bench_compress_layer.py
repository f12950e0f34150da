"""Seconds to compress one LLM-sized linear layer with the default calibrated VQConfig, and an
extrapolation to whole Llama-2-7B / Llama-2-70B models.

A layer's calibrated compression in ``vqlib.compress`` costs: accumulating its input statistics
(H = X^T X, and with the original-output target C = X_ref^T X, or W C = Y_ref^T X for a layer narrower
than its input) over the calibration tokens, then ``gptq_vq`` (Hessian-weighted k-means per codebook group, the GPTQ
column loop, codebook/scale fine-tuning). Both are timed here on synthetic but LLM-like inputs:
tokens with a decaying spectrum and a few outlier channels (as LLM activations have), weights
with varying row norms, and X_ref = X plus a small perturbation (the upstream compression error).
The block forwards of the depth-linear path come on top (about 2 x (groups + 1) block forwards per
batch per block; small next to the per-layer math at 7B scale).

    python benchmarks/bench_compress_layer.py                         # 3 Llama-2-7B shapes, CPU
    python benchmarks/bench_compress_layer.py --device cuda --tokens 131072
    python benchmarks/bench_compress_layer.py --shapes 4096x4096 --threads 1

Shapes are (out, in) as nn.Linear stores them: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine_description, setup_threads

from vqlib.compress import VQConfig
from vqlib.compress.calibrated import gptq_vq
from vqlib.compress.calibration import _accumulate_gram, symmetric_from_upper

# (out, in) -> layers per block; blocks. Llama-2-70B uses grouped-query attention (8 kv heads).
MODELS = {
    "Llama-2-7B": (32, {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}),
    "Llama-2-70B": (80, {(8192, 8192): 2, (1024, 8192): 2, (28672, 8192): 2, (8192, 28672): 1}),
}


def synthetic_inputs(n_in: int, tokens: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """(tokens, n_in) activations: a 1/sqrt(rank) spectrum through a random mixing, 1% outlier channels x20."""
    rank = min(n_in, 512)
    spectrum = 1.0 / torch.arange(1, rank + 1).float().sqrt()
    mix = torch.randn(rank, n_in, generator=gen) * spectrum[:, None]
    outliers = torch.randperm(n_in, generator=gen)[: max(1, n_in // 100)]
    mix[:, outliers] *= 20
    x = torch.randn(tokens, rank, generator=gen).to(device) @ mix.to(device)
    return x + 0.05 * torch.randn(tokens, n_in, generator=gen).to(device)


def statistics(x: torch.Tensor, x_ref: torch.Tensor, y_ref: torch.Tensor | None, chunk: int = 8192):
    """(H, C, W C) as the block path accumulates them (float32, chunked like batches): X^T X on and above
    the diagonal; C = X_ref^T X, or for a layer narrower than its input W C = Y_ref^T X from the original
    outputs ``y_ref`` (which the original block's pass computes anyway: not timed here), C then None."""
    n = x.shape[1]
    h = torch.zeros(n, n, device=x.device)
    c = None if y_ref is not None else torch.zeros(n, n, device=x.device)
    wc = None if y_ref is None else torch.zeros(y_ref.shape[1], n, device=x.device)
    for s in range(0, x.shape[0], chunk):
        b = x[s : s + chunk]
        _accumulate_gram(h, b)
        if wc is not None:
            wc.addmm_(y_ref[s : s + chunk].T, b)
        else:
            c.addmm_(x_ref[s : s + chunk].T, b)
    scale = 1.0 / x.shape[0]
    return symmetric_from_upper(h) * scale, None if c is None else c * scale, None if wc is None else wc * scale


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_layer(out_f: int, in_f: int, cfg: VQConfig, tokens: int, device: str, seed: int) -> tuple[float, float]:
    """(seconds for the statistics, seconds for gptq_vq) of one (out_f, in_f) layer."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_f, in_f, generator=gen) * torch.rand(out_f, 1, generator=gen).add(0.5) * 0.02).to(device)
    x = synthetic_inputs(in_f, tokens, gen, device)
    x_ref = x + 0.1 * x.std() * torch.randn(x.shape, generator=gen).to(device)
    y_ref = x_ref @ weight.T if out_f < in_f else None
    sync(device)
    t0 = time.perf_counter()
    h, c, wc = statistics(x, x_ref, y_ref)
    sync(device)
    t1 = time.perf_counter()
    gptq_vq(weight, h, cfg, seed, cross=c, weighted_cross=wc)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def extrapolate(seconds: dict[tuple[int, int], float]) -> dict[str, float]:
    """Hours per model: measured shapes directly, others scaled by out * in^2 (the GPTQ loop and
    fine-tune cost) from the measured shape with the same ratio out / in or the nearest one."""
    hours = {}
    for model, (blocks, shapes) in MODELS.items():
        total = 0.0
        for (o, i), count in shapes.items():
            if (o, i) in seconds:
                t = seconds[(o, i)]
            else:
                (mo, mi), mt = min(seconds.items(), key=lambda kv: abs(kv[0][0] / kv[0][1] - o / i))
                t = mt * (o * i * i) / (mo * mi * mi)
            total += count * t
        hours[model] = blocks * total / 3600
    return hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="(out)x(in)")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens (SmolLM2 runs use 128 x 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="{}", help="VQConfig fields as JSON (default: the default config)")
    args = parser.parse_args()
    import json

    setup_threads(args.threads)
    cfg = VQConfig(**json.loads(args.config))
    print(f"# {machine_description(args.device)}")
    print(f"# VQConfig: {args.config}; {args.tokens} calibration tokens; device {args.device}")
    print("| layer (out x in) | statistics s | gptq_vq s | total s |")
    print("|---|---|---|---|")
    seconds = {}
    for k, spec in enumerate(args.shapes):
        out_f, in_f = (int(v) for v in spec.lower().split("x"))
        stat_s, vq_s = time_layer(out_f, in_f, cfg, args.tokens, args.device, seed=k)
        seconds[(out_f, in_f)] = stat_s + vq_s
        print(f"| {out_f} x {in_f} | {stat_s:.1f} | {vq_s:.1f} | {stat_s + vq_s:.1f} |", flush=True)
    for model, h in extrapolate(seconds).items():
        print(f"# {model}: ~{h:.1f} h of per-layer work ({MODELS[model][0]} blocks; block forwards not included)")
    print(f"# load avg at the end: {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
