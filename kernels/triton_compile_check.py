"""Compile the Triton VQLinear kernels for an NVIDIA architecture without a GPU, and report ptxas's
registers / spills, shared memory and 128-bit loads per kernel variant.

Build errors (bad layouts, dtypes, resources) show up here instead of on a rented GPU: the launches
are the exact ones ``triton_vq_ops`` would make (built from meta tensors of the real shapes, with
the tile plan of a GPU of ``--sms`` multiprocessors), compiled by Triton down to a cubin.

    python -m vqlib.kernels.triton_compile_check            # sm_90 (H100/H200), all planned variants
    python -m vqlib.kernels.triton_compile_check --arch 80 --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import triton_vq_jit as jit
from .triton_crossover import admissible
from .triton_tiles import _pow2, tile_candidates
from .triton_vq import CUDA_CPP_PATHS, DEQUANT_MATMUL_MIN_BATCH
from .triton_vq_ops import dequantize_launches, linear_launches

_TYPE = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
}
# (name, vector_dim, num_codebooks, codebook_bits, group_size, codebook_dtype, scale_granularity)
FORMATS = [
    ("d8_2x8", 8, 2, 8, None, "fp16", "row"),
    ("d4_1x8", 4, 1, 8, None, "fp16", "row"),
    ("d8_1x16", 8, 1, 16, None, "fp16", "row"),
    ("d4_2x8_g128_int8", 4, 2, 8, 128, "int8", "row"),
    ("d8_1x8_g128_int8_group", 8, 1, 8, 128, "int8", "group"),
]
# rarer formats: odd d, M = 3, 10-bit codes in int16, small groups, 1-dim vectors, group scales
EXOTIC = [
    ("d3_3x10_g6_int8", 3, 3, 10, 6, "int8", "row"),
    ("d1_1x4_groupscale", 1, 1, 4, None, "fp16", "group"),
    ("d16_2x12_g256", 16, 2, 12, 256, "fp16", "none"),
]
BATCHES = (1, 4, 16, 64, 128, DEQUANT_MATMUL_MIN_BATCH, 1024)


def _meta_args(out_f: int, in_f: int, fmt) -> tuple:
    """Meta tensors (no memory) with a VQLinear's shapes and dtypes, in vq_linear argument order."""
    _, d, m, b, group, cb_dtype, scale = fmt
    nv = -(-in_f // d)
    g = 1 if group is None else -(-nv * d // group)
    meta = dict(device="meta")
    codes = torch.empty(out_f, nv, m, dtype=torch.uint8 if b <= 8 else torch.int16, **meta)
    codebooks = torch.empty(g, m, 2**b, d, dtype=torch.float16 if cb_dtype == "fp16" else torch.int8, **meta)
    cbs = torch.empty(g, m, dtype=torch.float16, **meta) if cb_dtype == "int8" else None
    s = 1 if scale == "row" else -(-nv * d // 128)
    scales = None if scale == "none" else torch.empty(out_f, s, dtype=torch.float16, **meta)
    bias = torch.empty(out_f, dtype=torch.float16, **meta)
    return codes, codebooks, cbs, scales, bias, None, in_f, d, group or 0, 128 if scale == "group" else 0


def _signature(fn, args, meta) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and attributes of a launch (positional args, then meta keywords).
    Attributes mirror the JIT's specialisation: 16-byte aligned pointers (fresh torch allocations)
    and ints divisible by 16 are marked so; without them no load would be vectorised."""
    is_const = {p.name for p in fn.params if p.is_constexpr}
    constexprs = {k: v for k, v in meta.items() if k in is_const}
    runtime = {k: v for k, v in meta.items() if k not in is_const and k not in ("num_warps", "num_stages")}
    sig, attrs = {}, {}
    for name, value in [*zip(fn.arg_names, args), *runtime.items()]:
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPE[value.dtype]
        else:
            sig[name] = "i1" if isinstance(value, bool) else "i32"
        if isinstance(value, torch.Tensor) or (type(value) is int and value % 16 == 0):
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    sig.update({name: "constexpr" for name in constexprs})
    return sig, constexprs, attrs


def _ptxas_path(arch: int) -> str:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    # Triton 3.6 picks a ptxas per architecture (a separate one for Blackwell): get_ptxas(arch); 3.5 takes none.
    return (get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()).path


def _ptxas_stats(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run(
            [_ptxas_path(arch), "-v", f"--gpu-name={arch_flag}", str(path), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
    }


def compile_launch(launch, arch: int) -> dict:
    fn = getattr(jit, launch.kernel)
    sig, constexprs, attrs = _signature(fn, launch.args, launch.meta)
    options = {k: launch.meta[k] for k in ("num_warps", "num_stages") if k in launch.meta}
    start = time.perf_counter()
    compiled = triton.compile(
        triton.compiler.ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    ptx = compiled.asm["ptx"]
    return {
        "kernel": launch.kernel,
        "compile_s": round(time.perf_counter() - start, 2),
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_stats(ptx, arch),
        "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
        "v2_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v2", ptx)),
        # with num_stages > 1 the pipeliner turns the gathers into async copies to shared memory
        "cp_async_16B": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*, 0x10,", ptx)),
        "cp_async_other": len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*, 0x[48],", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"mma\.sync", ptx)),
        "constexprs": {
            k: v
            for k, v in constexprs.items()
            if k.startswith("BLOCK") or k in ("SPLIT", "SPLIT_K", "IEEE", "PREFETCH")
        },
        **options,
    }


def planned_launches(quick: bool, sms: int, exotic: bool = False, default_only: bool = False):
    """Every distinct launch the dispatch can make for the benchmark's formats, batches and dtypes: each path
    that can run a batch, in each of its tile plans (the GPU's measured choice picks among them;
    ``triton_crossover``), or only the default plans. ``exotic``: the rarer formats, also with float32 activations."""
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (8192, 28672)]
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if exotic else (torch.float16, torch.bfloat16)
    for fmt in EXOTIC if exotic else FORMATS[:2] if quick else FORMATS:
        for dtype in dtypes:
            for out_f, in_f in shapes:
                args = _meta_args(out_f, in_f, fmt)
                for batch in BATCHES:
                    x = torch.empty(batch, in_f, dtype=dtype, device="meta")
                    for path in (p for p in admissible(batch) if p not in CUDA_CPP_PATHS):  # nvcc builds those
                        if path == "dequant_matmul":
                            yield fmt[0], dtype, batch, dequantize_launches(*args[:4], None, *args[6:], dtype)[1]
                            continue
                        nv, dp = args[0].shape[1], _pow2(fmt[1])
                        plans = tile_candidates(path, batch, out_f, nv, dp, x.device, sms, x.element_size())
                        for plan in plans[:1] if default_only else plans:
                            yield fmt[0], dtype, batch, linear_launches(x, *args, path, plan=plan)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arch", type=int, default=90, help="compute capability x10 (80 A100, 89 L4/4090, 90 H100/H200)"
    )
    parser.add_argument(
        "--sms", type=int, default=132, help="multiprocessors assumed by the split-K plan (H100 SXM/H200: 132)"
    )
    parser.add_argument("--quick", action="store_true", help="two formats, one shape")
    parser.add_argument("--exotic", action="store_true", help="the rarer formats (odd d, M=3, B=10/12, ...) and fp32")
    parser.add_argument("--default-plans", action="store_true", help="only each path's default tile plan")
    parser.add_argument("--json", type=Path, help="write the per-variant results here")
    args = parser.parse_args(argv)
    seen, rows, failures = set(), [], 0
    for fmt, dtype, batch, launches in planned_launches(args.quick, args.sms, args.exotic, args.default_plans):
        for launch in launches:
            sig, constexprs, _ = _signature(getattr(jit, launch.kernel), launch.args, launch.meta)
            key = (launch.kernel, tuple(sorted(sig.items())), tuple(sorted(map(str, launch.meta.items()))))
            if key in seen:
                continue
            seen.add(key)
            try:
                row = {
                    "format": fmt,
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    **compile_launch(launch, args.arch),
                }
            except Exception as exc:  # noqa: BLE001 - report every failing variant, then exit non-zero
                failures += 1
                row = {
                    "format": fmt,
                    "dtype": str(dtype),
                    "batch": batch,
                    "kernel": launch.kernel,
                    "error": f"{type(exc).__name__}: {str(exc)[-600:]}",
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    spills = [r for r in rows if r.get("spill_store_bytes")]
    print(f"sm_{args.arch}: {len(rows)} variants compiled, {failures} failed, {len(spills)} with register spills")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "sms": args.sms, "variants": rows}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
