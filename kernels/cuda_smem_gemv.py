"""The shared-memory codebook GEMV (``cuda/vq_smem_gemv.cu``): ``VQLinear`` at 1-8 tokens on CUDA, one more path of
the Triton kernels' measured dispatch (``triton_crossover``), named ``smem_gemv``.

Why it exists: Triton cannot index shared memory per thread, so its GEMV gathers codebook entries through L1, whose
tag rate caps batch 1 at an estimated 2-4x fp16 at 8192x8192 (docs/kernels.md). This kernel keeps the codebooks of
its K chunk in shared memory, replicated so that a warp's gathers hit distinct banks (AQLM's 2x8 layout), and the
activations of each lane's vectors in registers. It has not run on a GPU yet: the dispatch only picks it where it
was measured faster than the Triton paths on the GPU at hand, after checking its output against the layer's reference
(and each plan variant's against the default plan's; ``triton_crossover``); a kernel that disagrees is disabled with a
warning. By the default rule (nothing measured) the Triton GEMV runs.

Covered: uint8 codes (codebook_bits <= 8), vector_dim 4 or 8, 1 or 2 codebooks, per-layer or grouped codebooks,
fp16 or int8 codebooks, row / group / no scales, bias, fp16 and bf16 activations, 1-8 tokens; rows whose vector
count is a multiple of what a lane loads (``lane_vectors``). ``format_reason`` names what is not covered.

Backends: PTX through the CUDA driver (``cuda_driver``) for CUDA tensors; for CPU tensors the same source compiled by
g++ with ``cuda/vq_emu.h`` (threads emulated, slow; the tests use it), cached under ~/.cache/vqlib.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import lzma
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import KernelBuildError

CUDA_DIR = Path(__file__).with_name("cuda")
SOURCE = CUDA_DIR / "vq_smem_gemv.cu"
EMU_HEADER = CUDA_DIR / "vq_emu.h"
PTX = CUDA_DIR / "vq_smem_gemv.ptx.xz"  # built by build_ptx
NVCC_COMMAND = ["nvcc", "-arch=compute_80", "-ptx", "-O3"]  # sm_80 and newer; the driver compiles it for the GPU
THREADS = 256
MAX_TOKENS = 8
TOKEN_TEMPLATES = (1, 2, 4, 8)  # instantiated in the .cu
BLOCK_SMEM_BUDGET = 100 * 1024  # two blocks per SM on H100/H200 (228 KB of shared memory per SM)
BLOCKS_PER_SM = 2  # grid target: one resident wave (two blocks fit an SM), so each block's table fill serves more rows
EMULATED_SMS = 2  # CPU emulation: a small grid
EMULATED_SMEM = 96 * 1024


def token_template(tokens: int) -> int:
    return next(t for t in TOKEN_TEMPLATES if t >= tokens)


def lane_vectors(vector_dim: int, num_codebooks: int, tokens: int) -> int:
    """Vectors a lane owns per row (``lane_vectors`` in the .cu): their activations, VL*D*T floats, stay in
    registers, and their codes, VL*M bytes, are one load of at most 16 bytes."""
    return min(max(1, 64 // (vector_dim * token_template(tokens))), 16 // num_codebooks)


def entry_bytes(vector_dim: int, int8: bool) -> int:
    return vector_dim * (1 if int8 else 2)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class SmemTile:
    """A measured variant of the default plan (``tile`` of ``vqlib::vq_linear`` for path ``smem_gemv``); 0 keeps
    the default of a field."""

    copies: int = 0  # replicas of each codebook entry in shared memory (a power of two)
    rows_per_block: int = 0
    half_sum: int = 0  # 1: M = 2 fp16 entries summed as half2 (one fp16 rounding per weight; the .cu's "f16h")

    def encode(self) -> list[int]:
        return [self.copies, self.rows_per_block, self.half_sum]

    @classmethod
    def decode(cls, tile: list[int]) -> "SmemTile":
        if len(tile) != 3 or min(tile) < 0 or tile[2] > 1 or tile[0] & (tile[0] - 1):
            raise ValueError(
                f"smem_gemv tile: expected [copies (0 or a power of two), rows_per_block >= 0, half_sum 0/1], got {tile}"
            )
        return cls(*tile)

    def describe(self) -> str:
        parts = [
            f"{self.copies} copies of each entry" if self.copies else "",
            f"{self.rows_per_block} rows per block" if self.rows_per_block else "",
            "codebook pairs summed in fp16" if self.half_sum else "",
        ]
        return "shared-memory plan: " + (", ".join(p for p in parts if p) or "default")


Tile = SmemTile  # the plan variant class of this path (triton_vq.CUDA_CPP_PATHS)


@dataclass(frozen=True)
class SmemPlan:
    kernel: str
    grid: tuple[int, int]  # (row blocks, chunks): chunks > 1 splits K (fp32 partials + vq_splitk_reduce)
    smem: int  # dynamic shared memory bytes per block
    lanes_per_row: int
    rows_per_block: int
    groups_per_chunk: int
    copies: int
    warps_k: int = 1  # cuda_smem_mma: warps side by side along K (the GEMV uses lanes_per_row instead)


@dataclass(frozen=True)
class SmemLayout:
    """What a shared-memory kernel family covers (the GEMV here, the tensor-core ``cuda_smem_mma``)."""

    name: str  # in reasons
    max_tokens: int
    token_template: Callable[[int], int]  # tokens -> the instantiated token count that runs them
    lane_vectors: Callable[[int, int, int], int]  # (vector_dim, M, tokens) -> vectors a lane owns per row


def covered_reason(
    layout: SmemLayout, codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x_dtype, tokens, memory
) -> str | None:
    """Why ``layout``'s kernels cannot run this format / input (None: they can); see ``shape_reason``."""
    if x_dtype not in (torch.float16, torch.bfloat16):
        return f"{x_dtype} activations not covered (float16, bfloat16)"
    if tokens > layout.max_tokens:
        return f"{tokens} tokens above the {layout.name}'s {layout.max_tokens}"
    if codes.dtype != torch.uint8:
        return "codebook_bits > 8: a 65,536-entry codebook does not fit shared memory"
    if rowset is not None:
        return "fused projections (one codebook set per projection) not covered"
    _, nv, m = codes.shape
    if vector_dim not in (4, 8) or m not in (1, 2):
        return f"vector_dim={vector_dim}, M={m} not covered (vector_dim 4 or 8, M 1 or 2)"
    vl = layout.lane_vectors(vector_dim, m, tokens)
    if nv % vl:
        return (
            f"{nv} vectors per row, not a multiple of the {vl} a lane loads at {layout.token_template(tokens)} tokens"
        )
    group_vecs = group_size // vector_dim
    if group_vecs and not (group_vecs % (32 * vl) == 0 or (group_vecs % vl == 0 and _pow2(group_vecs // vl))):
        return f"codebook groups of {group_vecs} vectors do not tile lanes of {vl} vectors"
    if scale_group_size and (scale_group_size // vector_dim) % vl:
        return f"scale groups of {scale_group_size // vector_dim} vectors do not tile lanes of {vl} vectors"
    if not memory:
        return None
    if not (codes.is_contiguous() and codebooks.is_contiguous()):
        return "codes or codebooks not contiguous"
    if codes.data_ptr() % 16 or codebooks.data_ptr() % 16:
        return "codes or codebooks not 16-byte aligned"
    return None


GEMV_LAYOUT = SmemLayout("shared-memory GEMV", MAX_TOKENS, token_template, lane_vectors)


def shape_reason(
    codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x_dtype, tokens, memory: bool = True
) -> str | None:
    """Why the kernel cannot run this format / input (None: it can). Arguments as ``vqlib::vq_linear``'s;
    ``memory``: also check contiguity and alignment (not while dynamo traces: fake tensors have no data pointer;
    ``linear`` checks them when it runs)."""
    return covered_reason(
        GEMV_LAYOUT, codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x_dtype, tokens, memory
    )


def layer_reason(layout: SmemLayout, layer, x: Tensor) -> str | None:
    """``covered_reason`` for a layer and an input (memory checks skipped while dynamo traces)."""
    from .triton_vq import op_args, tokens

    codes, codebooks, _, _, _, rowset, _, vector_dim, group, sgs = op_args(layer)
    memory = not torch.compiler.is_compiling()
    return covered_reason(layout, codes, codebooks, rowset, vector_dim, group, sgs, x.dtype, tokens(x), memory)


def format_reason(layer, x: Tensor) -> str | None:
    """``shape_reason`` for a layer and an input."""
    return layer_reason(GEMV_LAYOUT, layer, x)


def plan(codes, codebooks, vector_dim, group_size, tokens, bf16, device, tile: SmemTile | None = None) -> SmemPlan:
    """Grid, shared memory and lane layout of one call (the format passed ``shape_reason``)."""
    n, nv, m = codes.shape
    k, int8 = codebooks.shape[2], codebooks.dtype == torch.int8
    sms, smem_limit = _device_limits(torch.device(device))
    return _plan(n, nv, m, k, int8, vector_dim, group_size, tokens, bf16, sms, smem_limit, tile)


@functools.lru_cache(maxsize=1024)  # shapes only: decoding asks the same plan for every token of every layer
def _plan(n, nv, m, k, int8, vector_dim, group_size, tokens, bf16, sms, smem_limit, tile) -> SmemPlan:
    t, vl, eb = token_template(tokens), lane_vectors(vector_dim, m, tokens), entry_bytes(vector_dim, int8)
    budget = min(smem_limit, BLOCK_SMEM_BUDGET)
    copies = tile.copies if tile and tile.copies else 128 // eb  # interleaved: one warp phase hits distinct banks
    while copies > 1 and m * k * copies * eb + 4 * m > budget:
        copies //= 2
    group_vecs = group_size // vector_dim
    if group_vecs == 0 or group_vecs % (32 * vl) == 0:
        lanes, groups_per_chunk = 32, 1
    else:  # a chunk spans several groups: as many as fit, a power of two
        lanes_per_group = group_vecs // vl
        groups_per_chunk = 32 // lanes_per_group
        while groups_per_chunk > 1 and groups_per_chunk * (m * k * copies * eb + 4 * m) > budget:
            groups_per_chunk //= 2
        lanes = lanes_per_group * groups_per_chunk
    smem = groups_per_chunk * (m * k * copies * eb + 4 * m)
    if smem > smem_limit:
        raise ValueError(f"smem_gemv: {smem} B of shared memory per block above this device's {smem_limit}")
    chunks = math.ceil(nv / (lanes * vl))
    rows_per_pass = THREADS // 32 * (32 // lanes)
    row_blocks = max(1, math.ceil(BLOCKS_PER_SM * sms / chunks))
    rows = tile.rows_per_block if tile and tile.rows_per_block else math.ceil(n / row_blocks)
    rows = rows_per_pass * math.ceil(rows / rows_per_pass)
    half_sum = bool(tile and tile.half_sum)
    if half_sum and (m != 2 or int8):
        raise ValueError(f"smem_gemv: half_sum needs M = 2 fp16 codebooks, got M = {m}, {'int8' if int8 else 'fp16'}")
    cb = "i8" if int8 else "f16h" if half_sum else "f16"
    name = f"vq_smem_gemv_d{vector_dim}_m{m}_t{t}_{'bf16' if bf16 else 'f16'}_{cb}"
    return SmemPlan(name, (math.ceil(n / rows), chunks), smem, lanes, rows, groups_per_chunk, copies)


def tile_candidates(layer, x: Tensor) -> list[list[int] | None]:
    """The default plan (None) and the variants the dispatch times: no replication (more blocks per SM and groups per
    chunk, bank conflicts), 4x the rows per block (fewer codebook fills), for grouped codebooks 2 copies (between:
    full replication leaves d8 2x8 at groups of 128 with 2 lanes per row and a K split of in/128, i.e. fp32 partials
    as large as the codes), and for two fp16 codebooks their sum in half2."""
    from .triton_vq import tokens

    base = plan(layer.codes, layer.codebooks, layer.vector_dim, layer.group_size or 0, tokens(x), False, x.device)
    variants = [SmemTile(copies=1), SmemTile(rows_per_block=4 * base.rows_per_block)]
    if layer.group_size and base.copies > 2:  # grouped: fewer copies fit more groups per chunk, fewer fp32 partials
        variants.append(SmemTile(copies=2))
    if layer.codes.shape[2] == 2 and layer.codebooks.dtype == torch.float16:
        variants.append(SmemTile(half_sum=1))
    return [None] + [v.encode() for v in variants if not (v.copies == base.copies and not v.rows_per_block)]


@functools.cache
def _device_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory a block may opt in to)."""
    if device.type != "cuda":
        return EMULATED_SMS, EMULATED_SMEM
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.shared_memory_per_block_optin


# ---- kernel arguments (the structs of vq_smem_gemv.cu, same order) ------------------------------
_POINTERS = ("x", "codes", "codebooks", "codebook_scales", "scales", "bias", "out", "partials")
_INTS = "n nv in_features x_stride tokens k group_vecs s scale_group_vecs lanes_per_row rows_per_block"
_INTS += " groups_per_chunk copies bias_kind warps_k"


class GemvArgs(ctypes.Structure):
    _fields_ = [(p, ctypes.c_void_p) for p in _POINTERS] + [(i, ctypes.c_int) for i in _INTS.split()]


class ReduceArgs(ctypes.Structure):
    _fields_ = [(p, ctypes.c_void_p) for p in ("partials", "bias", "out")]
    _fields_ += [(i, ctypes.c_int) for i in ("n", "tokens", "splits", "bias_kind", "bf16")]


_BIAS_KIND = {None: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear(
    x,
    codes,
    codebooks,
    codebook_scales,
    scales,
    bias,
    rowset,
    in_features,
    vector_dim,
    group_size,
    scale_group_size,
    tile: list[int] | None = None,
) -> Tensor:
    """x (..., in_features) -> (..., out) in x's dtype. Arguments as ``vqlib::vq_linear``'s."""
    args = (codes, codebooks, codebook_scales, scales, bias, rowset, in_features, vector_dim, group_size)
    return launch("smem_gemv", shape_reason, plan, SmemTile, x, *args, scale_group_size, tile)


def launch(name, reason_of, plan_of, tile_cls, x, codes, codebooks, codebook_scales, scales, bias, rowset,
           in_features, vector_dim, group_size, scale_group_size, tile) -> Tensor:  # fmt: skip
    """Checks a call with ``reason_of`` (a ``shape_reason``), launches the kernel of ``plan_of`` (a ``plan``) and, for
    a split K range, the reduce: (..., out) in x's dtype. Shared by the GEMV and ``cuda_smem_mma``."""
    x2 = x.reshape(-1, in_features)  # (tokens, in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens, n, nv = x2.shape[0], codes.shape[0], codes.shape[1]
    why = reason_of(codes, codebooks, rowset, vector_dim, group_size, scale_group_size, x.dtype, tokens)
    if why is not None:
        raise ValueError(f"{name}: {why}")
    if tokens == 0:  # nothing to launch (a grid of zero blocks is an invalid launch)
        return x.new_empty(*x.shape[:-1], n)
    bf16, variant = x.dtype == torch.bfloat16, tile_cls.decode(tile) if tile else None
    p = plan_of(codes, codebooks, vector_dim, group_size, tokens, bf16, x.device, variant)
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)  # (tokens, out)
    chunks = p.grid[1]
    partials = torch.empty(chunks, tokens, n, dtype=torch.float32, device=x.device) if chunks > 1 else None
    bias_kind = _BIAS_KIND[None if bias is None else bias.dtype]
    args = GemvArgs(
        x2.data_ptr(), codes.data_ptr(), codebooks.data_ptr(), _ptr(codebook_scales), _ptr(scales), _ptr(bias),
        out.data_ptr(), _ptr(partials), n, nv, in_features, x2.stride(0), tokens, codebooks.shape[2],
        group_size // vector_dim, 1 if scales is None else scales.shape[1], scale_group_size // vector_dim,
        p.lanes_per_row, p.rows_per_block, p.groups_per_chunk, p.copies, bias_kind, p.warps_k,
    )  # fmt: skip
    backend = _backend(x.device)
    backend.launch(p.kernel, p.grid, THREADS, p.smem, args)
    if partials is not None:
        reduce = ReduceArgs(partials.data_ptr(), _ptr(bias), out.data_ptr(), n, tokens, chunks, bias_kind, int(bf16))
        backend.launch("vq_splitk_reduce", (math.ceil(tokens * n / 256), 1), 256, 0, reduce)
    return out.reshape(*x.shape[:-1], n)


# ---- backends -----------------------------------------------------------------------------------
def _backend(device: torch.device):
    if device.type == "cuda":
        return _driver(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return _emulator()
    raise ValueError(f"smem_gemv: expected CUDA tensors (or CPU tensors for the emulator), got {device}")


class _Driver:
    """The shipped PTX on one CUDA device, a module per kernel, loaded (and compiled by the driver) at first use."""

    def __init__(self, device_index: int):
        self.device_index = device_index
        self.modules = {}

    def _module(self, name: str):
        from .cuda_driver import CudaDriverError, PtxModule

        if name not in self.modules:
            try:
                torch.empty(1, device="cuda")  # torch's context exists and is current
                self.modules[name] = PtxModule(shipped_ptx()["modules"][name], f"{PTX.name}:{name}")
            except (CudaDriverError, OSError, KeyError) as exc:
                raise KernelBuildError(f"smem_gemv: cannot load {name} from {PTX.name} ({exc})") from exc
        return self.modules[name]

    def launch(self, name: str, grid, threads: int, smem: int, args) -> None:
        with torch.cuda.device(self.device_index):
            self._module(name).launch(name, grid, threads, smem, [args])


@functools.cache
def _driver(device_index: int) -> _Driver:
    return _Driver(device_index)


class _Emulator:
    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))

    def launch(self, name: str, grid, threads: int, smem: int, args) -> None:
        fn = getattr(self.lib, f"{name}_emu")
        fn.argtypes = [type(args), ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t]
        fn.restype = None
        fn(args, grid[0], grid[1], threads, smem)


@functools.cache
def _emulator() -> _Emulator:
    return _Emulator(build_emulator())


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def kernel_names() -> list[str]:
    """Every kernel of the .cu: the GEMV instantiations, the tensor-core ones (``cuda_smem_mma``) and the reduce."""
    gemv = [
        f"vq_smem_gemv_d{d}_m{m}_t{t}_{x}_{cb}"
        for d in (4, 8)
        for m in (1, 2)
        for t in TOKEN_TEMPLATES
        for x in ("f16", "bf16")
        for cb in ("f16", "i8", "f16h")
        if cb != "f16h" or m == 2
    ]
    mma = [
        f"vq_smem_mma_d{d}_m{m}_t{t}_{x}_{cb}"
        for d in (4, 8)
        for m in (1, 2)
        for t in (8, 16)
        for x in ("f16", "bf16")
        for cb in ("f16", "i8")
    ]
    return [*gemv, *mma, "vq_splitk_reduce"]


def _nvcc_defines(name: str) -> list[str]:
    """The -D flags that make the .cu define only kernel ``name``."""
    if name == "vq_splitk_reduce":
        return ["-DVQ_REDUCE_ONLY"]
    kind, rest = (
        ("VQ_MMA", name.removeprefix("vq_smem_mma_"))
        if "_mma_" in name
        else ("VQ_GEMV", name.removeprefix("vq_smem_gemv_"))
    )
    d, m, t, x, cb = rest.split("_")
    flags = dict(VQ_KIND=kind, VQ_D=d[1:], VQ_M=m[1:], VQ_T=t[1:], VQ_XN=x, VQ_BF16=str(x == "bf16").lower(), VQ_CN=cb)
    flags["VQ_CB"] = {"f16": "CB_F16", "i8": "CB_I8", "f16h": "CB_F16_HALF_SUM"}[cb]
    return [f"-D{k}={v}" for k, v in flags.items()]


@functools.cache
def shipped_ptx() -> dict:
    """{"source_sha256": the .cu it was built from, "modules": {kernel name: PTX}} (one module per kernel)."""
    return json.loads(lzma.decompress(PTX.read_bytes()))


def build_ptx(target: Path = PTX) -> Path:
    """Regenerate the shipped PTX with nvcc (``python -m vqlib.kernels.cuda_smem_gemv``): one module per kernel, so
    that the driver compiles only the kernels a process runs (all at once take over a minute); xz-compressed JSON,
    written atomically."""
    modules = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in kernel_names():
            ptx = Path(tmp) / f"{name}.ptx"
            cmd = [*NVCC_COMMAND, *_nvcc_defines(name), str(SOURCE), "-o", str(ptx)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"nvcc failed on {name}:\n{result.stderr[-2000:]}")
            modules[name] = ptx.read_text()
    blob = json.dumps({"source_sha256": source_hash(), "modules": modules}).encode()
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(lzma.compress(blob, preset=9))
    os.replace(partial, target)
    shipped_ptx.cache_clear()
    return target


def check_ptx(arch: int = 90, driver_version: int = 12080) -> dict[str, dict]:
    """Assemble every shipped module as a CUDA 12 driver would (version line lowered) with Triton's bundled ptxas:
    {kernel: {"registers", "spill_store_bytes"}} (None where ptxas failed). No GPU needed."""
    from concurrent.futures import ThreadPoolExecutor

    from .cuda_driver import ptx_for_driver
    from .triton_compile_check import _ptxas_stats

    def assemble(item):
        return item[0], _ptxas_stats(ptx_for_driver(item[1], driver_version), arch)

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return dict(pool.map(assemble, shipped_ptx()["modules"].items()))


def build_emulator(cache_dir: Path | None = None) -> Path:
    """Compile the .cu for this CPU (g++, C++20) once per source version; returns the shared library."""
    digest = hashlib.sha256(SOURCE.read_bytes() + EMU_HEADER.read_bytes()).hexdigest()[:16]
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vqlib"
    library = cache_dir / f"vq_smem_gemv_emu_{digest}.so"
    if library.exists():
        return library
    compiler = shutil.which("g++")
    if compiler is None:
        raise KernelBuildError("smem_gemv emulator: no g++ on PATH (it compiles cuda/vq_smem_gemv.cu for the CPU)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # never leave a half-written library behind
        partial = Path(tmp) / library.name
        cmd = [
            compiler,
            "-std=c++20",
            "-O2",
            "-pthread",
            "-shared",
            "-fPIC",
            "-x",
            "c++",
            str(SOURCE),
            "-o",
            str(partial),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"smem_gemv emulator: g++ failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)
    return library


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build (default) or check the shipped PTX of the shared-memory GEMV.")
    parser.add_argument("--check", action="store_true", help="assemble every module for sm_90 (Triton's ptxas)")
    args = parser.parse_args(argv)
    if not args.check:
        print(build_ptx())
        return 0
    stats = check_ptx()
    failed = sorted(k for k, v in stats.items() if v["registers"] is None or v["spill_store_bytes"])
    regs = [v["registers"] for v in stats.values() if v["registers"] is not None]
    print(f"{len(stats)} modules for sm_90: registers {min(regs)}-{max(regs)}, failed or spilling: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
