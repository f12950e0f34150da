"""The CUDA C++ shared-memory tensor-core kernel (vqlib.kernels.cuda_smem_mma) equals the VQLinear reference.

Without a GPU its source runs in the CPU emulator (vq_emu.h: each CUDA thread a std::thread, mma.sync as a warp-wide
exchange computing the PTX ISA's fragment layout). That checks the K permutation, the fragments, the half2 decode,
the warps' reduction and the split K; not the tensor cores' own rounding or speed. The ``gpu`` tests run the shipped
PTX.
"""

import shutil

import pytest
import torch

pytest.importorskip("triton")

from test_kernels_cuda_smem import (  # noqa: E402
    FORMATS,
    assert_compiles_and_replays,
    assert_matches,
    make_layer,
    reference,
)
from test_kernels_triton import no_log_while_compiling, random_layer  # noqa: E402, F401  (a fixture)
from vqlib.kernels import cuda_smem_gemv as sg  # noqa: E402
from vqlib.kernels import cuda_smem_mma as sm  # noqa: E402
from vqlib.kernels import triton_crossover as tc  # noqa: E402
from vqlib.kernels import triton_vq as tv  # noqa: E402
from vqlib.kernels import triton_vq_ops  # noqa: E402, F401  (defines torch.ops.vqlib.vq_linear)

from vqlib import kernels  # noqa: E402
from vqlib.compress import VQLinear  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulator needs g++")
DTYPES = (torch.float16, torch.bfloat16)
TOKENS = (1, 3, 8, 9, 16)  # both templates (8, 16), partly filled n8 tiles


def mma_linear(layer: VQLinear, x: torch.Tensor, tile=None) -> torch.Tensor:
    return torch.ops.vqlib.vq_linear(x, *tv.op_args(layer), "smem_mma", tile)


@needs_gxx
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(name, dtype):
    layer = make_layer(name)
    gen = torch.Generator().manual_seed(2)
    for tokens in TOKENS:
        x = torch.randn(tokens, layer.in_features, generator=gen).to(dtype)
        assert_matches(mma_linear(layer, x), reference(layer, x), dtype)


@needs_gxx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_matches_reference(dtype):
    """A row wider than one block's chunk: fp32 partials per chunk, summed in chunk order by vq_splitk_reduce."""
    layer = random_layer(dict(in_features=2048, out_features=24, vector_dim=8, num_codebooks=2), 5, "cpu")
    x = torch.randn(16, layer.in_features).to(dtype)
    p = sm.plan(layer.codes, layer.codebooks, 8, 0, 16, dtype == torch.bfloat16, "cpu")
    assert p.grid[1] == 2  # 256 vectors, chunks of 8 warps x 4 x J=4
    assert_matches(mma_linear(layer, x), reference(layer, x), dtype)


@needs_gxx
def test_one_fp16_codebook_rounds_each_weight_once():
    """M = 1 fp16 codebooks with row scales: the half2 decode gives fp16(entry * scale), the reference's W rounded
    once to fp16, exactly (one-hot rows; the bias is added in fp32 before the output's rounding)."""
    layer = random_layer(dict(in_features=512, out_features=40, vector_dim=8), 3, "cpu")
    w = layer.dequantize_weight().half().float()  # (out, in): W rounded to the activation dtype, as the reference
    cols = torch.linspace(0, layer.in_features - 1, 16).long()  # across all chunks
    eye = torch.eye(layer.in_features)[cols].half()  # (16, in)
    assert torch.equal(mma_linear(layer, eye), (w.t() + layer.bias.float())[cols].half())


@needs_gxx
def test_lanes_past_the_row_add_exact_zeros():
    """Lanes past the row's vectors (the last chunk) gather a zero entry: a non-finite entry that no code of the
    layer uses cannot leak into the output (0 * inf)."""
    layer = random_layer(dict(in_features=8 * 40, out_features=20, vector_dim=8, num_codebooks=2), 4, "cpu")
    assert layer.codes.shape[1] % (sm.WARPS * 4 * sm.lane_vectors(8, 2, 16)) != 0  # idle lanes in the last chunk
    with torch.no_grad():
        layer.codes.clamp_(min=1)
        layer.codebooks[:, :, 0] = float("inf")  # entry 0 of every codebook, never used
    x = torch.randn(16, layer.in_features).half()
    y = mma_linear(layer, x)
    assert torch.isfinite(y).all()
    assert_matches(y, reference(layer, x), torch.float16)


@needs_gxx
@pytest.mark.parametrize("name,variants", [("d4_1x8_g128_int8_groupscale", 4), ("d8_2x8_row_pad", 3)])
def test_every_tile_candidate_matches_reference(name, variants):
    """No replication, 4x the rows per block, 2 warps along K and, where the default gave up replicas to keep the
    chunk wide (groups), full replication."""
    layer = make_layer(name)
    for dtype in DTYPES:
        for tokens in (4, 16):
            x = torch.randn(tokens, layer.in_features).to(dtype)
            tiles = sm.tile_candidates(layer, x)
            assert tiles[0] is None and len(tiles) == 1 + variants
            for tile in tiles:
                assert_matches(mma_linear(layer, x, tile), reference(layer, x), dtype)


@needs_gxx
def test_strided_batched_and_empty_input():
    layer = make_layer("d8_2x8_row_pad")
    wide = torch.randn(2, 6, layer.in_features + 5).half()
    x = wide[..., : layer.in_features]  # (2, 6, in): 12 tokens, rows 5 elements apart
    y = mma_linear(layer, x)
    assert y.shape == (2, 6, layer.out_features)
    assert_matches(y, reference(layer, x), torch.float16)
    assert mma_linear(layer, x[:0]).shape == (0, 6, layer.out_features)


def test_format_reasons_and_tiles():
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(17, layer.in_features).half()
    assert "17 tokens above the shared-memory tensor-core kernel's 16" in sm.format_reason(layer, x)
    assert sm.format_reason(layer, x[:16]) is None
    assert "torch.float32 activations not covered" in sm.format_reason(layer, x[:1].float())
    with pytest.raises(ValueError, match=r"smem_mma: 17 tokens above"):
        sm.linear(x, *tv.op_args(layer), None)
    for bad in ([3, 0, 0], [0, 0, 3], [0, 0, 16], [0, 0], [0, -1, 0]):
        with pytest.raises(ValueError, match=r"smem_mma tile: expected"):
            sm.MmaTile.decode(bad)
    assert "2 warps along K" in tc.describe_tile("smem_mma", sm.MmaTile(warps_k=2).encode())


@pytest.mark.parametrize("name", FORMATS)
def test_plans_fit_an_h200(name, monkeypatch):
    """At 8192 x 8192 on an H200: the table, the zero entry and the warps' partial tiles fit the block budget, rows
    tile the passes, the grid fills the GPU and the chunks cover every vector."""
    monkeypatch.setattr(sg, "_device_limits", lambda device: (132, 227 * 1024))
    monkeypatch.setattr(sm, "_device_limits", lambda device: (132, 227 * 1024))
    layer = VQLinear(**dict(FORMATS[name], in_features=8192, out_features=8192))
    for tokens in (1, 8, 9, 16):
        p = sm.plan(layer.codes, layer.codebooks, layer.vector_dim, layer.group_size or 0, tokens, False, "cpu")
        assert p.kernel.startswith(
            f"vq_smem_mma_d{layer.vector_dim}_m{layer.num_codebooks}_t{8 if tokens <= 8 else 16}"
        )
        assert p.smem <= sg.BLOCK_SMEM_BUDGET and p.copies >= 1 and p.warps_k in (1, 2, 4, 8)
        assert p.rows_per_block % (sm.WARPS // p.warps_k * 16) == 0
        assert p.grid[0] * p.grid[1] >= 132 and p.grid[0] * p.rows_per_block >= layer.out_features
        vl = sm.lane_vectors(layer.vector_dim, layer.num_codebooks, tokens)
        assert p.grid[1] * p.warps_k * 4 * vl >= layer.num_vectors


# ---- the measured dispatch ----------------------------------------------------------------------
@needs_gxx
def test_measured_fastest_runs_at_16_tokens(cpu_registry, monkeypatch):
    monkeypatch.setattr(tc, "_RANKINGS", {})
    monkeypatch.setattr(tc, "MEASURED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv(kernels.ENV_SWITCH, "triton_vq_dequant_matmul,cuda_vq_smem_mma")
    clock = {"dequant_matmul": 9.0, "smem_mma": 3.0}
    monkeypatch.setattr(tc, "_time_path", lambda path, probe, args, flush, tile=None: clock[path] + (tile is not None))
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(16, layer.in_features).half()
    decision = kernels.explain(layer, x)
    assert decision.path == "cuda_vq_smem_mma"
    assert "measured fastest usable at 16 tokens" in decision.reason and "smem_mma 3.0 us" in decision.reason
    with torch.no_grad():
        assert_matches(layer(x), reference(layer, x), torch.float16)
    assert kernels.explain(layer, torch.randn(17, layer.in_features).half()).path == "triton_vq_dequant_matmul"


def test_default_rule_never_picks_it(cpu_registry, monkeypatch):
    monkeypatch.setenv(tc.ENV_TUNING, "off")
    layer = make_layer("d8_2x8_row_pad")
    x = torch.randn(12, layer.in_features).half()
    assert tc.ranking(layer, x, 12).paths[-1] == "smem_mma"
    assert kernels.explain(layer, x).path == "triton_vq_gemm"
    monkeypatch.setenv(kernels.ENV_SWITCH, "cuda_vq_smem_mma")  # forced: it runs, and says what it cannot run
    assert kernels.explain(layer, x).path == "cuda_vq_smem_mma"
    decision = kernels.explain(layer, torch.randn(17, layer.in_features).half())
    assert decision.path == "reference" and "17 tokens above" in decision.reason


@pytest.mark.usefixtures("cpu_registry", "no_log_while_compiling")
def test_compile_fullgraph_through_registry_at_12_tokens():
    layer = make_layer("d8_2x8_row_pad")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(12, layer.in_features).half()
    assert_matches(compiled(x), reference(layer, x), torch.float16)


# ---- native GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(name, dtype):
    layer = make_layer(name, device="cuda")
    for tokens in (1, 5, 8, 9, 16):
        x = torch.randn(tokens, layer.in_features, device="cuda").to(dtype)
        ref = reference(layer, x)
        for tile in sm.tile_candidates(layer, x):
            assert_matches(mma_linear(layer, x, tile), ref, dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_and_compile():
    layer = make_layer("d4_1x8_g128_int8_groupscale", device="cuda")
    x = torch.randn(16, layer.in_features, device="cuda", dtype=torch.float16)
    assert_compiles_and_replays(lambda x: mma_linear(layer, x), layer, x)
