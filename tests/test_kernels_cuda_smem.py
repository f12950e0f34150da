"""The CUDA C++ shared-memory GEMV (vqlib.kernels.cuda_smem_gemv) equals the VQLinear reference.

Without a GPU its source runs in the CPU emulator (g++, one thread per CUDA thread: indexing, masking, the
shared-memory table and the lane sums are checked; memory ordering and bank conflicts are not). The ``gpu`` tests
run the shipped PTX through the CUDA driver, under CUDA graphs and torch.compile.
"""

import re
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_triton import no_log_while_compiling, random_layer  # noqa: E402, F401  (a fixture)
from vqlib.kernels import cuda_smem_gemv as sg  # noqa: E402
from vqlib.kernels import triton_crossover as tc  # noqa: E402
from vqlib.kernels import triton_vq as tv  # noqa: E402
from vqlib.kernels import triton_vq_ops  # noqa: E402, F401  (defines torch.ops.vqlib.vq_linear)

from vqlib import kernels  # noqa: E402
from vqlib.compress import VQLinear  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulator needs g++")

# What the kernel covers, each dimension at least once: d 4/8, M 1/2, 16 and 256 entries, per-layer and grouped
# codebooks (a chunk of several groups, one group per lane, chunk inside a group), fp16/int8 codebooks,
# row/group/no scales, fp32/fp16/bf16/no bias, in_features padded to a multiple of d, out not a multiple of anything.
FORMATS = {
    "d8_2x8_row_pad": dict(in_features=1021, out_features=70, vector_dim=8, num_codebooks=2),
    "d4_1x8_g128_int8_groupscale": dict(
        in_features=512,
        out_features=45,
        vector_dim=4,
        group_size=128,
        codebook_dtype="int8",
        scale_granularity="group",
        scale_group_size=128,
        bias_dtype=torch.float16,
    ),
    "d8_1x8_g256_noscale_nobias": dict(
        in_features=1024, out_features=33, vector_dim=8, group_size=256, scale_granularity="none", bias=False
    ),
    "d4_2x4_g64_bf16bias": dict(
        in_features=256,
        out_features=37,
        vector_dim=4,
        num_codebooks=2,
        codebook_bits=4,
        group_size=64,
        bias_dtype=torch.bfloat16,
    ),
}
DTYPES = (torch.float16, torch.bfloat16)
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # of max |reference|: the output's rounding


def make_layer(name: str, seed: int = 0, device: str = "cpu") -> VQLinear:
    return random_layer(FORMATS[name], seed, device)


def reference(layer: VQLinear, x: torch.Tensor) -> torch.Tensor:
    """fp32 x @ W_hat^T + bias (the kernel accumulates in fp32; only its output is rounded)."""
    bias = 0 if layer.bias is None else layer.bias.float()
    return x.float() @ layer.dequantize_weight().t() + bias


def smem_linear(layer: VQLinear, x: torch.Tensor, tile=None) -> torch.Tensor:
    return torch.ops.vqlib.vq_linear(x, *tv.op_args(layer), "smem_gemv", tile)


def assert_matches(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() + 1e-6
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3g} above {REL_TOL[dtype]} x {scale:.3g}"


# ---- CPU emulator -------------------------------------------------------------------------------
@needs_gxx
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(name, dtype):
    layer = make_layer(name)
    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 3, 8):  # token templates 1, 4 (3 used) and 8; several chunks: the split-K reduce
        x = torch.randn(tokens, layer.in_features, generator=gen).to(dtype)
        assert_matches(smem_linear(layer, x), reference(layer, x), dtype)


@needs_gxx
def test_strided_and_batched_input():
    layer = make_layer("d8_2x8_row_pad")
    wide = torch.randn(2, 3, layer.in_features + 5).half()
    x = wide[..., : layer.in_features]  # (2, 3, in): rows 5 elements apart
    y = smem_linear(layer, x)
    assert y.shape == (2, 3, layer.out_features)
    assert_matches(y, reference(layer, x), torch.float16)
    assert smem_linear(layer, x[:0]).shape == (0, 3, layer.out_features)  # no tokens: nothing launched


@needs_gxx
@pytest.mark.parametrize("name", FORMATS)
def test_decode_is_bit_exact(name):
    """One-hot rows give the weight columns back exactly (plus the bias, added in fp32 before the rounding)."""
    layer = make_layer(name)
    w = layer.dequantize_weight()  # (out, in)
    bias = 0 if layer.bias is None else layer.bias.float()
    cols = torch.linspace(0, layer.in_features - 1, 8).long()  # across all groups and chunks
    eye = torch.eye(layer.in_features)[cols].half()  # (8, in)
    assert torch.equal(smem_linear(layer, eye), (w.t() + bias)[cols].half())


@needs_gxx
@pytest.mark.parametrize("name,variants", [("d4_1x8_g128_int8_groupscale", 3), ("d8_2x8_row_pad", 3)])
def test_every_tile_candidate_matches_reference(name, variants):
    """No replication, 4x the rows per block, 2 copies (grouped codebooks), the half2 sum of the pair (two fp16
    codebooks)."""
    layer = make_layer(name)
    for dtype in DTYPES:
        x = torch.randn(1, layer.in_features).to(dtype)
        tiles = sg.tile_candidates(layer, x)
        assert tiles[0] is None and len(tiles) == 1 + variants
        for tile in tiles:
            assert_matches(smem_linear(layer, x, tile), reference(layer, x), dtype)


@needs_gxx
def test_half_sum_rounds_each_weight_once_to_fp16():
    """One-hot rows through the half2-sum variant give s * fp16(e0 + e1): the pair's sum rounded once."""
    layer = make_layer("d8_2x8_row_pad")
    codes = layer.codes.long()  # (out, nv, 2)
    entries = [layer.codebooks[0, m][codes[..., m]].float() for m in range(2)]  # (out, nv, d) each
    pair = (entries[0] + entries[1]).half().float().flatten(1)[:, : layer.in_features]  # (out, in)
    w = pair * layer.scales.float()
    cols = torch.linspace(0, layer.in_features - 1, 8).long()
    eye = torch.eye(layer.in_features)[cols].half()
    y = smem_linear(layer, eye, sg.SmemTile(half_sum=1).encode())
    assert torch.equal(y, (w.t() + layer.bias.float())[cols].half())
    with pytest.raises(ValueError, match="half_sum needs M = 2 fp16 codebooks"):
        smem_linear(
            make_layer("d8_1x8_g256_noscale_nobias"), torch.zeros(1, 1024).half(), sg.SmemTile(half_sum=1).encode()
        )


def test_format_reasons_name_what_is_not_covered():
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(1, layer.in_features)
    assert "torch.float32 activations not covered" in sg.format_reason(layer, x)
    assert "9 tokens above" in sg.format_reason(layer, x.half().expand(9, -1))
    wide = VQLinear(64, 8, vector_dim=8, codebook_bits=16)
    assert "65,536-entry codebook" in sg.format_reason(wide, x[:, :64].half())
    odd = VQLinear(60, 8, vector_dim=4)  # 15 vectors per row, a lane loads 16 at one token
    assert "15 vectors per row, not a multiple of the 16" in sg.format_reason(odd, torch.randn(1, 60).half())
    assert "vector_dim=3, M=1 not covered" in sg.format_reason(VQLinear(48, 8, vector_dim=3), torch.randn(1, 48).half())
    with pytest.raises(ValueError, match=r"smem_gemv: torch.float32 activations not covered"):
        sg.linear(x, *tv.op_args(layer), None)
    for bad in ([3, 0, 0], [0, 0, 2], [0, 0], [-1, 0, 0]):  # the kernel masks lanes with copies - 1
        with pytest.raises(ValueError, match=r"expected \[copies \(0 or a power of two\)"):
            sg.SmemTile.decode(bad)


@pytest.mark.parametrize("name", FORMATS)
def test_plans_fit_an_h200(name, monkeypatch):
    """At the benchmark's sizes on an H200 (132 SMs, 227 KB of opt-in shared memory): the table fits the block
    budget, rows tile the warps' passes, and the grid fills the GPU."""
    monkeypatch.setattr(sg, "_device_limits", lambda device: (132, 227 * 1024))
    spec = dict(FORMATS[name], in_features=8192, out_features=8192)
    layer = VQLinear(**spec)
    for tokens in (1, 2, 4, 8):
        p = sg.plan(layer.codes, layer.codebooks, layer.vector_dim, layer.group_size or 0, tokens, False, "cpu")
        assert p.smem <= sg.BLOCK_SMEM_BUDGET and p.copies >= 1 and p.copies & (p.copies - 1) == 0
        assert p.rows_per_block % (sg.THREADS // 32 * (32 // p.lanes_per_row)) == 0
        assert p.grid[0] * p.grid[1] >= 132 and p.grid[0] * p.rows_per_block >= layer.out_features
        vl = sg.lane_vectors(layer.vector_dim, layer.num_codebooks, tokens)
        assert p.grid[1] * p.lanes_per_row * vl >= layer.num_vectors  # the chunks cover every vector


def test_shipped_ptx_is_built_from_this_source():
    shipped = sg.shipped_ptx()
    assert shipped["source_sha256"] == sg.source_hash(), "run: python -m vqlib.kernels.cuda_smem_gemv"
    assert sorted(shipped["modules"]) == sorted(sg.kernel_names()) and len(shipped["modules"]) == 81 + 32  # + smem_mma
    for name, ptx in shipped["modules"].items():  # one kernel per module: the driver compiles only what runs
        assert ptx.count(".entry ") == 1 and f".entry {name}(" in ptx
        # what the driver compiles at first use stays small: NVVM once unswitched the row loop into 2 MB per kernel
        assert len(ptx) < 256 * 1024, f"{name}: {len(ptx)} bytes of PTX"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (compiles the PTX)")
@pytest.mark.parametrize(
    "name",
    [
        "vq_smem_gemv_d4_m2_t8_bf16_i8",
        "vq_smem_gemv_d8_m2_t1_f16_f16h",
        "vq_smem_mma_d4_m1_t16_bf16_i8",
        "vq_splitk_reduce",
    ],
)
def test_nvcc_builds_one_kernel_per_module(name, tmp_path):
    ptx = tmp_path / "one.ptx"
    subprocess.run([*sg.NVCC_COMMAND, *sg._nvcc_defines(name), str(sg.SOURCE), "-o", str(ptx)], check=True)
    assert re.findall(r"\.entry (\w+)\(", ptx.read_text()) == [name]


def test_every_shipped_module_assembles_for_sm90_under_a_cuda12_driver():
    """What a CUDA 12 driver JIT-compiles (the version line lowered to ISA 8.0): Triton's bundled ptxas (CUDA 12.8)
    assembles every module for the H100/H200 without spills, in at most 128 registers (two 256-thread blocks per SM)."""
    pytest.importorskip("vqlib.kernels.triton_compile_check")
    stats = sg.check_ptx()
    assert len(stats) == len(sg.kernel_names())
    assert all(v["spill_store_bytes"] == 0 and v["registers"] <= 128 for v in stats.values()), stats


# ---- the measured dispatch ----------------------------------------------------------------------
@pytest.fixture
def measured_fp16(monkeypatch, cpu_registry):
    """Rankings measured on CPU tensors with a fake clock on which the shared-memory GEMV is fastest."""
    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv(kernels.ENV_SWITCH, "triton_vq_dequant_matmul,cuda_vq_smem_gemv")
    clock = {"dequant_matmul": 9.0, "smem_gemv": 2.0}
    monkeypatch.setattr(tc, "_time_path", lambda path, probe, args, flush, tile=None: clock[path] + (tile is not None))


@needs_gxx
def test_measured_fastest_runs_and_says_why(measured_fp16):
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(1, layer.in_features).half()
    decision = kernels.explain(layer, x)
    assert decision.path == "cuda_vq_smem_gemv"
    assert "measured fastest usable at 1 tokens" in decision.reason and "smem_gemv 2.0 us" in decision.reason
    with torch.no_grad():
        assert_matches(layer(x), reference(layer, x), torch.float16)
    x16 = torch.randn(16, layer.in_features).half()  # above its 8 tokens: not a candidate
    assert kernels.explain(layer, x16).path == "triton_vq_dequant_matmul"


@needs_gxx
def test_wrong_output_is_disabled_never_chosen(measured_fp16, monkeypatch):
    real = torch.ops.vqlib.vq_linear

    class Ops:  # the shared-memory GEMV returns a corrupted output, as a kernel mis-compiled on a GPU would
        def vq_linear(self, x, *args):
            y = real(x, *args)
            return y + 1.0 if args[-2] == "smem_gemv" else y

    monkeypatch.setattr(tc.torch, "ops", type("T", (), {"vqlib": Ops()})())
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(1, layer.in_features).half()
    with pytest.warns(RuntimeWarning, match=r"'cuda_vq_smem_gemv' computes a wrong output on this GPU"):
        decision = kernels.explain(layer, x)
    assert decision.path == "triton_vq_dequant_matmul"
    monkeypatch.setenv(kernels.ENV_SWITCH, "cuda_vq_smem_gemv")  # alone, it says why it no longer runs
    decision = kernels.explain(layer, x)
    assert decision.path == "reference" and "cuda_vq_smem_gemv: computes a wrong output" in decision.reason


@needs_gxx
def test_reference_check_samples_rows_across_the_layer(measured_fp16, monkeypatch):
    """Large layers are checked on REFERENCE_CHECK_ROWS rows spread over the layer (no dense fp32 copy): a wrong last
    row is still caught."""
    real = torch.ops.vqlib.vq_linear
    monkeypatch.setattr(tc, "REFERENCE_CHECK_ROWS", 8)

    class Ops:
        def vq_linear(self, x, *args):
            y = real(x, *args)
            if args[-2] == "smem_gemv":
                y[..., -1] += 1.0
            return y

    monkeypatch.setattr(tc.torch, "ops", type("T", (), {"vqlib": Ops()})())
    layer = make_layer("d8_2x8_row_pad")
    with pytest.warns(RuntimeWarning, match=r"'cuda_vq_smem_gemv' computes a wrong output"):
        assert kernels.explain(layer, torch.randn(1, layer.in_features).half()).path == "triton_vq_dequant_matmul"


def test_default_rule_never_picks_it(cpu_registry, monkeypatch):
    monkeypatch.setenv(tc.ENV_TUNING, "off")
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(1, layer.in_features).half()
    ranking = tc.ranking(layer, x, 1)
    assert ranking.paths[-2:] == ("smem_gemv", "smem_mma") and ranking.times_us is None
    assert kernels.explain(layer, x).path == "triton_vq_gemv"
    monkeypatch.setenv(kernels.ENV_SWITCH, "cuda_vq_smem_gemv")  # forced: it runs, and says what it cannot run
    assert kernels.explain(layer, x).path == "cuda_vq_smem_gemv"
    decision = kernels.explain(layer, x.float())
    assert decision.path == "reference" and "torch.float32 activations not covered" in decision.reason


@pytest.mark.usefixtures("cpu_registry", "no_log_while_compiling")
def test_compile_fullgraph_through_registry_in_fp16():
    """Dynamo traces the dispatch, which asks this kernel's format_reason at 1-8 fp16 tokens: nothing in it may need
    a real tensor (a data-pointer check once broke fullgraph for every CUDA VQLinear at 1-8 tokens)."""
    layer = make_layer("d8_2x8_row_pad")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, layer.in_features).half()
    assert_matches(compiled(x), reference(layer, x), torch.float16)


# ---- native GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(name, dtype):
    layer = make_layer(name, device="cuda")
    for tokens in (1, 2, 3, 5, 8):
        x = torch.randn(tokens, layer.in_features, device="cuda").to(dtype)
        ref = reference(layer, x)
        for tile in sg.tile_candidates(layer, x):
            assert_matches(smem_linear(layer, x, tile), ref, dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_is_bit_exact():
    for name in FORMATS:
        layer = make_layer(name, device="cuda")
        w = layer.dequantize_weight()
        bias = 0 if layer.bias is None else layer.bias.float()
        cols = torch.linspace(0, layer.in_features - 1, 8, device="cuda").long()
        eye = torch.eye(layer.in_features, device="cuda")[cols].half()
        assert torch.equal(smem_linear(layer, eye), (w.t() + bias)[cols].half()), name


@pytest.mark.gpu
@needs_cuda
def test_gpu_compile_fullgraph_and_cuda_graph():
    layer = make_layer("d8_2x8_row_pad", device="cuda")
    x = torch.randn(1, layer.in_features, device="cuda", dtype=torch.float16)
    assert_compiles_and_replays(lambda x: smem_linear(layer, x), layer, x)


def assert_compiles_and_replays(run, layer: VQLinear, x: torch.Tensor) -> None:
    """``run`` (x -> layer output) under torch.compile(fullgraph=True) and captured in a CUDA graph, replayed on a new
    input, equals the reference."""
    compiled = torch.compile(run, fullgraph=True)
    assert_matches(compiled(x), reference(layer, x), x.dtype)
    static_x = x.clone()
    run(static_x)  # loads the module outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(static_y, reference(layer, new_x), x.dtype)
