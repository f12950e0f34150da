"""VQLinear / ScalarLinear storage format, bit accounting, config validation and the kernel registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqlib.compress import ScalarLinear, VQConfig, VQLinear
from vqlib.compress.format import decode_weight, pack_codes, unpack_codes
from vqlib.compress.scalar import pack_bits, rtn_quantize, unpack_bits


def _layer(**kw):
    args = dict(vector_dim=2, num_codebooks=1, codebook_bits=2, bias=True)
    args.update(kw)
    return VQLinear(4, 2, **args)


def within_kernel_tolerance(y, exact) -> bool:
    """The CPU kernels' stated tolerance: 1e-3 of max |output| (cpu_lut_avx512 rounds its tables to 14 bits)."""
    return bool((y - exact).abs().max() <= 1e-3 * exact.abs().max())


def test_dequantize_matches_hand_computed_weight():
    layer = _layer(num_codebooks=2)
    # codebooks (G=1, M=2, K=4, d=2)
    layer.codebooks.copy_(
        torch.tensor([[[[1, 2], [3, 4], [5, 6], [7, 8]], [[0.5, 0], [0, 0.5], [1, 1], [-1, -1]]]]).half()
    )
    layer.codes.copy_(torch.tensor([[[0, 1], [3, 3]], [[2, 0], [1, 2]]], dtype=torch.uint8))
    layer.scales.copy_(torch.tensor([[2.0], [0.5]]).half())
    expected = torch.tensor(
        [
            [2 * (1 + 0), 2 * (2 + 0.5), 2 * (7 - 1), 2 * (8 - 1)],
            [0.5 * (5 + 0.5), 0.5 * (6 + 0), 0.5 * (3 + 1), 0.5 * (4 + 1)],
        ]
    )
    assert torch.equal(layer.dequantize_weight(), expected)
    x = torch.randn(3, 4)
    layer.bias.data.copy_(torch.tensor([0.25, -1.0]))
    exact = F.linear(x, expected, layer.bias)
    assert torch.allclose(layer._reference_linear(x), exact, atol=1e-6)  # the format's semantics
    assert within_kernel_tolerance(layer(x), exact)  # whichever kernel dispatch picks


def test_groups_int8_codebooks_and_group_scales():
    layer = VQLinear(
        8,
        1,
        vector_dim=2,
        codebook_bits=1,
        group_size=4,
        codebook_dtype="int8",
        scale_granularity="group",
        scale_group_size=2,
        bias=False,
    )
    assert tuple(layer.codebooks.shape) == (2, 1, 2, 2) and layer.codebooks.dtype == torch.int8
    assert tuple(layer.codebook_scales.shape) == (2, 1) and tuple(layer.scales.shape) == (1, 4)
    layer.codebooks.copy_(torch.tensor([[[[1, 2], [3, 4]]], [[[10, 20], [30, 40]]]], dtype=torch.int8))
    layer.codebook_scales.copy_(torch.tensor([[0.5], [0.25]]).half())
    layer.codes.copy_(torch.tensor([[[1], [0], [0], [1]]], dtype=torch.uint8))
    layer.scales.copy_(torch.tensor([[1.0, 2.0, 4.0, 8.0]]).half())
    # vectors 0,1 use group 0 (scale 0.5), vectors 2,3 use group 1 (scale 0.25)
    expected = torch.tensor([[1.5, 2.0, 2 * 0.5, 2 * 1.0, 4 * 2.5, 4 * 5.0, 8 * 7.5, 8 * 10.0]])
    assert torch.equal(layer.dequantize_weight(), expected)


def test_dequantize_selected_rows():
    torch.manual_seed(0)
    layer = VQLinear(10, 6, vector_dim=4, num_codebooks=2, codebook_bits=3, group_size=4, scale_granularity="group",
                     scale_group_size=4, codebook_dtype="int8")  # fmt: skip
    layer.codebooks.copy_(torch.randint(-127, 128, layer.codebooks.shape))
    layer.codes.copy_(torch.randint(0, 8, layer.codes.shape))
    layer.scales.copy_(torch.rand(layer.scales.shape) + 0.5)
    rows = torch.tensor([5, 0, 3])
    assert torch.equal(layer.dequantize_weight(rows=rows), layer.dequantize_weight()[rows])


def test_padding_is_dropped_at_forward_time():
    layer = VQLinear(5, 3, vector_dim=4, codebook_bits=2, bias=False)
    assert layer.num_vectors == 2 and layer.in_padded == 8
    layer.codebooks.copy_(torch.randn(1, 1, 4, 4).half())
    layer.codes.copy_(torch.randint(0, 4, (3, 2, 1), dtype=torch.uint8))
    w = layer.dequantize_weight()
    assert w.shape == (3, 5)
    x = torch.randn(2, 5)
    assert torch.allclose(layer._reference_linear(x), x @ w.T, atol=1e-6)
    assert within_kernel_tolerance(layer(x), x @ w.T)
    with pytest.raises(ValueError, match="expected 5 input features"):
        layer(torch.randn(2, 8))


def test_int16_codes_round_trip_all_16_bit_values():
    codes = torch.tensor([0, 1, 32767, 32768, 40000, 65535])
    packed = pack_codes(codes, 16)
    assert packed.dtype == torch.int16
    assert torch.equal(unpack_codes(packed), codes)
    assert pack_codes(torch.tensor([3, 255]), 8).dtype == torch.uint8
    with pytest.raises(IndexError, match=r"\[0, 255\]"):
        pack_codes(torch.tensor([256]), 8)


def test_bits_per_weight_counts_codes_codebooks_and_scales():
    # The example: d=8, M=1, B=16 per-layer codebook on a 384x384 layer.
    layer = VQLinear(384, 384, vector_dim=8, codebook_bits=16, bias=False)
    expected = (384 * 48 * 16 + 65536 * 8 * 16 + 384 * 16) / (384 * 384)
    assert math.isclose(layer.bits_per_weight, expected)
    assert 58 < layer.bits_per_weight < 59  # 2 bits of codes + ~57 of codebook: big codebooks need big layers
    small = VQLinear(384, 1536, vector_dim=4, codebook_bits=8, bias=True)
    assert math.isclose(small.bits_per_weight, (1536 * 96 * 8 + 256 * 4 * 16 + 1536 * 16) / (384 * 1536))
    int8 = VQLinear(1536, 384, vector_dim=8, num_codebooks=2, codebook_dtype="int8", bias=False)
    assert int8.storage_bytes() == 384 * 192 * 2 + 2 * 256 * 8 + 2 * 2 + 384 * 2


def test_forward_keeps_input_dtype_and_matches_dequantized_weight():
    layer = VQLinear(16, 8, vector_dim=4, codebook_bits=3, bias=True, bias_dtype=torch.bfloat16)
    layer.codebooks.copy_(torch.randn(1, 1, 8, 4).half())
    layer.codes.copy_(torch.randint(0, 8, (8, 4, 1), dtype=torch.uint8))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 16, dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype
        ref = F.linear(x.float(), layer.dequantize_weight().to(dtype).float(), layer.bias.float())
        assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)


def test_decode_weight_without_scales():
    codes = torch.tensor([[[1], [0]]])
    codebooks = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = decode_weight(codes, codebooks, None, vector_dim=2, group_size=None, scale_group_size=None)
    assert torch.equal(w, torch.tensor([[3.0, 4.0, 1.0, 2.0]]))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_bit_packing_round_trip(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (1001,), generator=gen)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_scalar_rtn_levels_bits_and_error():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(300, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 300, generator=gen))
    errors = []
    for bits in (2, 3, 4):
        layer = ScalarLinear.from_linear(linear, bits, 128)
        groups = 3  # 128 + 128 + 44 columns
        assert math.isclose(layer.bits_per_weight, (64 * 300 * bits + 64 * groups * (16 + 8)) / (64 * 300))
        w = layer.dequantize_weight()
        q, scale, zero = rtn_quantize(linear.weight.detach(), bits, 128)
        assert int(q.max()) <= 2**bits - 1 and int(q.min()) >= 0
        # every weight is within half a step of its group's grid (no clipping: the grid spans min..max)
        step = scale.float().repeat_interleave(128, dim=1)[:, :300]
        ref = linear.weight.detach()
        assert bool(((w - ref).abs() <= step / 2 + 1e-3).all())
        errors.append(float((w - ref).norm() / ref.norm()))
    assert errors[0] > errors[1] > errors[2]
    x = torch.randn(4, 300)
    assert torch.allclose(layer(x), F.linear(x, w, linear.bias), atol=1e-5)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(algorithm="gptq"), "algorithm"),
        (dict(vector_dim=0), "vector_dim"),
        (dict(codebook_bits=17), "codebook_bits"),
        (dict(vector_dim=4, group_size=6), "group_size"),
        (dict(vector_dim=4, scale_granularity="group", scale_group_size=6), "scale_group_size"),
        (dict(codebook_dtype="fp8"), "codebook_dtype"),
        (dict(damping=0.0), "damping"),
        (dict(vector_dim=2.5), "vector_dim"),
        (dict(skip_modules="lm_head"), "skip_modules"),
        (dict(pad="crop"), "pad"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        VQConfig(**fields)


def test_config_dict_and_file_round_trip(tmp_path):
    cfg = VQConfig(algorithm="data_free", vector_dim=8, num_codebooks=2, group_size=256, skip_modules=["head*"])
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        VQConfig.from_dict({"vector_size": 4})
    (tmp_path / "c.yaml").write_text("algorithm: scalar_rtn\nscalar_bits: 4\n")
    assert VQConfig.from_file(tmp_path / "c.yaml").scalar_bits == 4
    (tmp_path / "c.json").write_text('{"vector_dim": 8}')
    assert VQConfig.from_file(tmp_path / "c.json").vector_dim == 8
    (tmp_path / "c.txt").write_text("")
    with pytest.raises(ValueError, match=".json, .yaml"):
        VQConfig.from_file(tmp_path / "c.txt")
