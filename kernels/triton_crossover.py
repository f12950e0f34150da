"""Which Triton path runs a ``VQLinear`` call on this GPU: measured once per layer shape, format, dtype and
number of tokens (rounded up to a power of two), like Triton's autotuner.

Why measured: where the fused kernels stop paying moves with the GPU (SM count, tensor-core and cuBLAS
speed) and with the shape. On CPUs the same crossover moved more than 10x between two hosts
(``cpu_crossover``), and a constant tuned on one made prefill 2-7x slower than dequant + BLAS on the other.
The issue's bound (never slower than 1.1x the fp16 original at 1,024 tokens) cannot rest on a guess.

How: the first eager call of a (device, activation dtype, layer type, out, in, format, token bucket) times
each path that can run it (``gemv`` up to GEMV_MAX_BATCH tokens, ``gemm``, ``dequant_matmul``) on a random
input of ``bucket`` tokens: one untimed call (compiles the kernel), then REPS calls, each after writing
twice the L2 (at least FLUSH_MIN_BYTES) so the layer's compressed bytes are read from memory as in decoding (a 2-bit layer fits in a 50 MB
L2), timed with CUDA events around the call while the GPU is kept busy (so the events time the kernels, not the
host's launch, as under CUDA graphs); the median wins. Each path is timed in each of its tile plans
(``triton_vq_ops.tile_candidates``: split-K depth, tile sizes, the GEMV's code prefetch), after checking that the
plan's output equals the default plan's; a path is ranked by its fastest plan, which the call then runs. A few ms
per key plus the plans' first compiles, once per process; layers of one shape and format share it.
``vqlib.kernels.explain`` prints the times and the chosen plan.

Not measured, and the default rule applies (GEMV_MAX_BATCH, DEQUANT_MATMUL_MIN_BATCH; the reason says so):
inside torch.compile tracing or CUDA-graph capture (nothing can be timed there: call ``tune(model, tokens)``
eagerly first), on non-CUDA tensors (the Triton interpreter), and with ``VQLIB_TRITON_TUNING=off``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ENV_TUNING = "VQLIB_TRITON_TUNING"  # "measure" (default) or "off" (default rule only)
PATHS = ("gemv", "gemm", "dequant_matmul")
# Paths never run on a GPU before this process: their default plan must also equal the layer's reference before it
# is timed (a wrong kernel is disabled with a warning, never chosen): the CUDA C++ shared-memory kernels.
CHECKED_AGAINST_REFERENCE = ("smem_gemv", "smem_mma")
MAX_BUCKET = 2048  # more tokens are timed at this many (the ranking no longer changes there, and memory stays bounded)
REPS = 5
FLUSH_MIN_BYTES = 64 << 20  # written between timed calls: at least this and twice the device's L2 (H200: 60 MB)
MEASURED_DEVICE_TYPES = ("cuda",)  # tests add "cpu" to drive the interpreter
# GPU spin before each timed call (about 0.5 ms at H200 clocks): longer than the host takes to launch a path (the
# custom op, the tile plan and Triton's launcher: tens of us, more than the flush's ~20 us), so the GPU never idles
# between the start event and the kernels. Else a path with more launches looks slower by host time that CUDA graphs
# (how decoding runs) remove, and a few-us batch-1 GEMV is timed as its launch. (Host and flush times are estimates:
# no GPU has run this yet.)
HOST_COVER_CYCLES = 1_000_000


@dataclass(frozen=True)
class PathRanking:
    """The paths that can run a call, fastest first, and the evidence."""

    paths: tuple[str, ...]
    bucket: int  # tokens the ranking was made for (a power of two)
    times_us: dict[str, float] | None = None  # measured (each path's fastest tile plan), or None: the default rule
    unmeasured_because: str = ""
    tiles: dict[str, list[int]] | None = None  # path -> its fastest tile plan (TilePlan.encode()), if not the default

    def tile(self, path: str) -> list[int] | None:
        """The ``tile`` argument of ``vqlib::vq_linear`` for ``path`` (None: its default plan)."""
        return (self.tiles or {}).get(path)

    def _us(self, path: str) -> str:
        if path not in self.times_us:
            return "not timed: out of memory"
        tile = self.tile(path)
        if tile is None:
            return f"{self.times_us[path]:.1f} us"
        return f"{self.times_us[path]:.1f} us with {describe_tile(path, tile)}"

    def why_chosen(self, path: str) -> str:
        """Why ``path`` runs (the first usable path of this ranking)."""
        if self.times_us is None:
            return f"default rule (not measured: {self.unmeasured_because})"
        times = ", ".join(f"{p} {self._us(p)}" for p in self.paths)  # fastest first, untimed last
        return f"measured fastest usable at {self.bucket} tokens on this device ({times})"

    def why_not(self, path: str, faster: str, tokens: int) -> str:
        """Why ``path`` declines a call of ``tokens`` tokens that ``faster`` takes."""
        if self.times_us is not None:
            return f"{faster} measured faster at {self.bucket} tokens on this device ({self._us(faster)} vs {self._us(path)})"
        from . import triton_vq as tv

        if path == "gemm":  # only the decode-then-cuBLAS crossover ranks anything above gemm by default
            rule = f"{tokens} tokens at or above the decode-then-cuBLAS crossover DEQUANT_MATMUL_MIN_BATCH={tv.DEQUANT_MATMUL_MIN_BATCH}"
        else:
            rule = f"{faster} first by the default rule"
        return f"{rule} (default rule, not measured: {self.unmeasured_because})"


def describe_tile(path: str, tile: list[int]) -> str:
    """Words for a ``tile`` argument of ``vqlib::vq_linear`` on ``path``."""
    from .triton_vq import CUDA_CPP_PATHS, cuda_cpp_module

    if path in CUDA_CPP_PATHS:
        return cuda_cpp_module(path).Tile.decode(tile).describe()
    from .triton_tiles import TilePlan

    return TilePlan.decode(tile).describe()


def bucket(tokens: int) -> int:
    return min(MAX_BUCKET, 1 << max(0, int(tokens) - 1).bit_length())


def admissible(tokens: int) -> tuple[str, ...]:
    """Paths built for this many tokens (the GEMVs keep every token row in registers). The CUDA C++ shared-memory
    kernels come last: the default rule (nothing measured) never picks them; only a measurement on the GPU at hand
    does."""
    from . import triton_vq as tv

    paths = PATHS if tokens <= tv.GEMV_MAX_BATCH else PATHS[1:]
    return paths + tuple(p for p in tv.CUDA_CPP_PATHS if tokens <= tv.cuda_cpp_module(p).MAX_TOKENS)


def default_ranking(tokens: int, because: str) -> PathRanking:
    from . import triton_vq as tv

    paths = admissible(tokens)
    if tokens >= tv.DEQUANT_MATMUL_MIN_BATCH:
        paths = ("dequant_matmul", "gemm")
    return PathRanking(paths, bucket(tokens), None, because)


def tuning_enabled() -> bool:
    raw = os.environ.get(ENV_TUNING, "measure").strip() or "measure"
    if raw not in ("measure", "off"):
        raise ValueError(f"{ENV_TUNING} must be 'measure' or 'off', got {raw!r}")
    return raw == "measure"


_RANKINGS: dict[tuple, PathRanking] = {}


def _key(layer: nn.Module, x: Tensor, n: int, usable: tuple[str, ...]) -> tuple:
    from . import _format_key

    shape = (layer.out_features, layer.in_features)
    return (str(x.device), x.dtype, type(layer).__name__, shape, _format_key(layer), n, usable)


def _unmeasurable(x: Tensor) -> str | None:
    if not tuning_enabled():
        return f"{ENV_TUNING}=off"
    if x.device.type not in MEASURED_DEVICE_TYPES:
        return f"{x.device.type} tensors run the Triton interpreter, whose times mean nothing"
    if torch.compiler.is_compiling():
        return (
            "traced by torch.compile before an eager call measured it (run vqlib.kernels.triton_crossover.tune first)"
        )
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return (
            "inside CUDA-graph capture before an eager call measured it (run vqlib.kernels.triton_crossover.tune first)"
        )
    return None


def ranking(layer: nn.Module, x: Tensor, tokens: int) -> PathRanking:
    """The ranking for ``layer`` at ``tokens`` tokens of ``x``'s dtype and device (measured on first use).
    Only the paths the registry may run now are timed (VQLINEAR_KERNELS, build failures): they are part of the key."""
    usable = _usable(layer, x, admissible(tokens))
    key = _key(layer, x, bucket(tokens), usable)
    if torch.compiler.is_compiling():  # read-only while tracing: the graph records the eager choice
        return _RANKINGS.get(key) or default_ranking(tokens, _unmeasurable(x) or "")
    if key in _RANKINGS:
        return _RANKINGS[key]
    why = _unmeasurable(x)
    if why is not None or len(usable) < 2:  # nothing to time, or nothing to choose from
        return default_ranking(tokens, why or "at most one path may run")
    _RANKINGS[key] = result = _measure(layer, x, usable, bucket(tokens))
    return result


def _usable(layer: nn.Module, x: Tensor, paths: tuple[str, ...]) -> tuple[str, ...]:
    """The paths the registry may run now (VQLINEAR_KERNELS, build failures) whose kernels cover this format."""
    from . import kernel_name_usable
    from .triton_vq import kernel_name, path_format_reason

    return tuple(
        p for p in paths if kernel_name_usable(kernel_name(p, layer)) and path_format_reason(p, layer, x) is None
    )


def _measure(layer: nn.Module, x: Tensor, paths: tuple[str, ...], n: int) -> PathRanking:
    """Time every tile plan of ``paths`` at ``n`` tokens; each path is ranked by its fastest plan. A path whose
    default plan fails to build is disabled (registry warning); another plan that fails is skipped with a warning.
    A path that runs out of memory at this size is ranked after the timed ones, as is every path when the probe
    does not fit."""
    times, tiles = {}, {}
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        try:
            gen = torch.Generator(device=x.device).manual_seed(n)
            probe = torch.randn(n, layer.in_features, device=x.device, generator=gen).to(x.dtype)  # (n, in)
            flush = torch.empty(_flush_bytes(x.device), dtype=torch.int8, device=x.device)
        except torch.OutOfMemoryError:
            return PathRanking(paths, n, None, f"out of memory allocating the {n}-token probe and L2 flush")
        for path in paths:
            timed = _time_tiles(layer, path, probe, flush)
            if timed:
                tile, times[path] = min(timed.items(), key=lambda item: item[1])
                if tile:
                    tiles[path] = list(tile)
    if not times:
        return PathRanking(paths, n, None, "no path could be timed (build failures or out of memory)")
    ranked = tuple(sorted(times, key=times.get)) + tuple(p for p in paths if p not in times)
    return PathRanking(ranked, n, times, tiles=tiles)


def _time_tiles(layer: nn.Module, path: str, probe: Tensor, flush: Tensor) -> dict[tuple, float]:
    """{encoded tile plan (() for the default): microseconds} of ``path``'s candidate plans."""
    from . import KernelBuildError, mark_broken
    from .triton_vq import kernel_name, op_args

    args, timed, expected = op_args(layer), {}, None
    tiles = _candidate_tiles(layer, path, probe)
    for tile in tiles:
        try:
            if tile is None and path in CHECKED_AGAINST_REFERENCE and not _matches_reference(layer, path, probe, args):
                return {}
            if tile is not None and not _same_output(path, probe, args, tile, expected):
                continue
            timed[tuple(tile or ())] = _time_path(path, probe, args, flush, tile)
            if tile is None and len(tiles) > 1:
                expected = _default_output(path, probe, args)
        except KernelBuildError as exc:
            if tile is None:  # the default plan: the kernel is unusable here
                mark_broken(kernel_name(path, layer), exc)
                return {}
            _warn_tile_failed(path, tile, "failed to build", exc)
        except torch.OutOfMemoryError:
            if tile is None:
                return {}  # too large at this size (decode-then-cuBLAS holds a dense weight): ranked last
    return timed


# Largest |difference| between a plan's output and the default plan's, relative to max |default|: a few rounding
# steps of the output dtype (plans differ only in the order of fp32 sums). A plan beyond it is wrong on this GPU.
AGREEMENT = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2, torch.float32: 1e-4}


def agrees(got: Tensor, expected: Tensor) -> tuple[bool, float]:
    """(within AGREEMENT for the dtype, max |got - expected| / max |expected|): one host sync, at measurement time."""
    scale = expected.abs().max().float().clamp_min(1e-6)
    err = float((got.float() - expected.float()).abs().max() / scale)
    return err <= AGREEMENT.get(expected.dtype, 1e-4), err


def _default_output(path: str, probe: Tensor, args: tuple) -> Tensor:
    return torch.ops.vqlib.vq_linear(probe, *args, path, None)  # (n, out): what every other plan must give


def _same_output(path: str, probe: Tensor, args: tuple, tile: list[int], expected: Tensor | None) -> bool:
    """Whether plan ``tile`` computes what the default plan did (checked once, before it may be chosen): a kernel
    variant that only the GPU could get wrong (a race, a mis-compiled layout) must never be picked for being fast."""
    if expected is None:
        return True
    ok, err = agrees(torch.ops.vqlib.vq_linear(probe, *args, path, tile), expected)
    if ok:
        return True
    _warn_tile_failed(path, tile, f"disagrees with the default plan (max error {err:.2e} of max |output|)")
    return False


REFERENCE_CHECK_ROWS = 1024  # output rows compared with the reference: spread over the layer, all when fewer


def _matches_reference(layer: nn.Module, path: str, probe: Tensor, args: tuple) -> bool:
    """Whether ``path``'s default plan computes the layer's reference output on the probe (on up to
    REFERENCE_CHECK_ROWS rows spread over every row block, so a large layer needs no dense fp32 copy); if not, its
    kernel is disabled for the process (one loud warning) and the other paths run."""
    from . import mark_broken
    from .triton_vq import kernel_name

    n = layer.out_features
    rows = torch.linspace(0, n - 1, min(n, REFERENCE_CHECK_ROWS), device=probe.device).round().long().unique()
    with torch.no_grad():  # the reference's arithmetic (VQLinear._reference_linear) on those rows
        weight = layer.dequantize_weight(rows=rows).to(probe.dtype)  # (rows, in)
        bias = None if layer.bias is None else layer.bias[rows].to(probe.dtype)
        expected = torch.nn.functional.linear(probe, weight, bias)  # (n, rows)
    ok, err = agrees(torch.ops.vqlib.vq_linear(probe, *args, path, None)[:, rows], expected)
    if ok:
        return True
    why = f"its output differs from the reference on this GPU (max error {err:.2e} of max |output|)"
    mark_broken(kernel_name(path, layer), RuntimeError(why), failure="computes a wrong output on this GPU")
    return False


def _candidate_tiles(layer: nn.Module, path: str, probe: Tensor) -> list[list[int] | None]:
    """None (the default plan) first, then the other plans of the path's ``tile_candidates``."""
    from .triton_tiles import _pow2, tile_candidates
    from .triton_vq import CUDA_CPP_PATHS, cuda_cpp_module

    if path in CUDA_CPP_PATHS:
        return cuda_cpp_module(path).tile_candidates(layer, probe)
    plan_path = "dequant" if path == "dequant_matmul" else path
    nv = layer.codes.shape[1]
    plans = tile_candidates(
        plan_path,
        probe.shape[0],
        layer.out_features,
        nv,
        _pow2(layer.vector_dim),
        probe.device,
        elem_bytes=probe.element_size(),
    )
    return [None] + [plan.encode() for plan in plans[1:]]


_WARNED_TILES: set = set()


def _warn_tile_failed(path: str, tile: list[int], what: str, exc: Exception | None = None) -> None:
    from .triton_tiles import TilePlan

    key = (path, tuple(tile))
    if key not in _WARNED_TILES:
        _WARNED_TILES.add(key)
        detail = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        warnings.warn(
            f"vqlib.kernels: {path} tile plan ({TilePlan.decode(tile).describe()}) {what} and is not "
            f"timed; the other plans of {path} still are{detail}",
            RuntimeWarning,
            stacklevel=3,
        )


def _flush_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return max(FLUSH_MIN_BYTES, 2 * torch.cuda.get_device_properties(device).L2_cache_size)


def _time_path(path: str, probe: Tensor, args: tuple, flush: Tensor, tile: list[int] | None = None) -> float:
    return _median_us(lambda: torch.ops.vqlib.vq_linear(probe, *args, path, tile), flush)


def _median_us(fn, flush: Tensor) -> float:
    """Median microseconds of fn() over REPS calls, each after ``flush`` was overwritten (a cold cache)."""
    fn()  # compiles
    if flush.device.type != "cuda":
        times = []
        for _ in range(REPS):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
    for start, end in events:
        flush.fill_(1)
        torch.cuda._sleep(HOST_COVER_CYCLES)  # see HOST_COVER_CYCLES
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


def tune(model: nn.Module, tokens=(1, 4, 16, 64, 256, 1024), dtype: torch.dtype = torch.float16) -> dict:
    """Measure the path and tile plan of every VQLinear / FusedVQLinear of ``model`` (on its CUDA device) at these
    token counts, eagerly, so that torch.compile and CUDA-graph capture later record measured choices.
    Returns {(module name, tokens): kernel name}."""
    from . import explain

    chosen = {}
    with torch.no_grad():  # with gradients the registry takes the differentiable reference path
        for name, module in model.named_modules():
            if type(module).__name__ not in ("VQLinear", "FusedVQLinear"):
                continue
            for n in tokens:
                x = torch.empty(n, module.in_features, dtype=dtype, device=module.codes.device)  # (n, in)
                chosen[(name, n)] = explain(module, x).path
    return chosen


def reset() -> None:
    """Forget every measurement (tests; or after changing GPU clocks)."""
    _RANKINGS.clear()


__all__ = [
    "ENV_TUNING",
    "PathRanking",
    "admissible",
    "bucket",
    "default_ranking",
    "describe_tile",
    "ranking",
    "reset",
    "tune",
]
