import math

import pytest
import torch

from vqlib.fsq import FSQ


def _seeded(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(
    "levels, dim, channel_first, shape",
    [
        ([8, 5, 5, 5], None, False, (2, 7, 4)),
        ([8, 5, 5, 5], 16, False, (3, 5, 16)),
        ([8, 5, 5, 5], None, True, (2, 4, 3, 5)),
        ([7, 6, 4], 12, True, (2, 12, 3, 2, 2)),
        ([3, 4], None, False, (4, 2)),
    ],
)
def test_decode_equals_quantized_in_eval(levels, dim, channel_first, shape):
    torch.manual_seed(0)
    q = FSQ(levels, dim, channel_first=channel_first).eval()
    x = _seeded(*shape, scale=2.0)
    out = q(x)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    token_shape = (shape[0], *shape[2:]) if channel_first else shape[:-1]
    assert out.indices.shape == token_shape and out.indices.dtype == torch.int64
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert out.loss.item() == 0.0
    # Training mode: the straight-through value is bit-identical too.
    assert torch.equal(q.train()(x).quantized, out.quantized)


def test_indices_biject_with_codes_and_all_levels_reachable():
    levels = [3, 4, 2, 5]
    q = FSQ(levels)
    size = math.prod(levels)
    all_codes = q.indices_to_codes(torch.arange(size))
    assert torch.unique(all_codes, dim=0).shape[0] == size
    # Grid of each channel: (digit - L//2) / (L//2).
    for i, level in enumerate(levels):
        expected = (torch.arange(level) - level // 2).float() / (level // 2)
        assert torch.equal(torch.unique(all_codes[:, i]), expected)

    # Uniform in [-8, 8]: for L=2 the paper's offset bound needs z < -atanh(1/(1+eps)) ~ -3.8 to reach -1.
    out = q((torch.rand(5000, 4, generator=torch.Generator().manual_seed(0)) - 0.5) * 16)
    assert 0 <= out.indices.min() and out.indices.max() < size
    for i, level in enumerate(levels):  # every level of every channel is reachable (eps-widened bound)
        assert torch.unique(out.quantized[:, i]).numel() == level
    # One index per distinct code and vice versa.
    pairs = torch.cat([out.quantized, out.indices[:, None].float()], dim=1)
    distinct = torch.unique(out.quantized, dim=0).shape[0]
    assert torch.unique(pairs, dim=0).shape[0] == distinct == torch.unique(out.indices).numel() > size // 2
    assert out.metrics["batch_usage"].item() == pytest.approx(distinct / size)


def test_zero_input_maps_to_zero_code_for_odd_and_even_levels():
    # The half-level offset for even levels keeps 0 on the grid (paper's bound).
    q = FSQ([8, 5, 2, 4])
    out = q(torch.zeros(1, 4))
    assert torch.equal(out.quantized, torch.zeros(1, 4))


@pytest.mark.parametrize("levels", [[8] * 6, [2] * 62, [8] * 20])
def test_huge_implicit_codebook_is_never_enumerated(levels):
    # 2^18, 2^62 and 2^60 codes: allocating the codebook (or an arange over it) would be impossible,
    # so forward + decode working on a few tokens shows all maths is per token.
    q = FSQ(levels).eval()
    assert q.codebook_size == math.prod(levels)
    x = _seeded(64, len(levels), scale=2.0)
    out = q(x)
    assert 0 <= out.indices.min() and out.indices.max() < q.codebook_size
    assert torch.equal(q.decode(out.indices), out.quantized)
    # Mixed-radix index computed independently in Python integers.
    digits = (out.quantized * torch.tensor([l // 2 for l in levels]) + torch.tensor([l // 2 for l in levels])).long()
    row = digits[0].tolist()
    expected = sum(d * math.prod(levels[:i]) for i, d in enumerate(row))
    assert out.indices[0].item() == expected


def test_straight_through_gradient_matches_bound_derivative():
    levels = [8, 5]
    q = FSQ(levels)
    x = _seeded(10, 2).requires_grad_(True)
    q(x).quantized.sum().backward()
    lv = torch.tensor(levels, dtype=torch.float32)
    half_l = (lv - 1) * (1 + q.eps) / 2
    shift = torch.atanh(torch.tensor([0.5, 0.0]) / half_l)
    expected = (1 - torch.tanh(x.detach() + shift) ** 2) * half_l / (lv // 2)
    torch.testing.assert_close(x.grad, expected)


def test_gradient_reaches_projections():
    torch.manual_seed(0)
    q = FSQ([5, 5, 5], dim=8)
    x = _seeded(6, 8).requires_grad_(True)
    q(x).quantized.square().sum().backward()
    for grad in (x.grad, q.project_in.weight.grad, q.project_out.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_mask_excludes_tokens_from_metrics():
    q = FSQ([4, 4])
    x = _seeded(2, 50, 2, scale=2.0)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[:, :10] = True
    x_other = x.clone()
    x_other[~mask] = 5.0  # masked tokens changed: metrics must not move
    full = q(x, mask=mask)
    for m in (full, q(x_other, mask=mask)):
        ref = q(x[mask])
        assert m.metrics.keys() == ref.metrics.keys()
        for key in ref.metrics:
            torch.testing.assert_close(m.metrics[key], ref.metrics[key])
    assert q(x).metrics["perplexity"] != full.metrics["perplexity"]
    with pytest.raises(TypeError, match="bool"):
        q(x, mask=mask.long())
    with pytest.raises(ValueError, match=r"\(2, 50\)"):
        q(x, mask=mask[:, :5])


def test_bad_inputs_and_options():
    q = FSQ([8, 5, 5], channel_first=False)
    with pytest.raises(ValueError, match="expected 3 features"):
        q(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        FSQ([8, 5, 5], channel_first=True)(torch.randn(3))
    bad = torch.randn(2, 3)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        q(bad)
    FSQ([8, 5, 5], check_finite=False)(torch.randn(2, 3))  # check can be skipped
    with pytest.raises(IndexError, match=r"\[0, 199\].*max 200"):
        q.decode(torch.tensor([0, 200]))
    with pytest.raises(IndexError, match="min -1"):
        q.decode(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r">= 2, got levels\[1\] = 1"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match="at least one level"):
        FSQ([])
    with pytest.raises(ValueError, match="2\\*\\*63"):
        FSQ([2] * 64)
    with pytest.raises(TypeError, match="floating point"):
        q(torch.ones(2, 3, dtype=torch.long))


def test_autocast_bf16_forward_backward():
    torch.manual_seed(0)
    q = FSQ([8, 5, 5, 5], dim=32, channel_first=True)
    x = _seeded(2, 32, 4, 4).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(x)
        assert out.quantized.dtype == torch.float32
        out.quantized.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(q.project_in.weight.grad).all()
    x_bf16 = x.detach().to(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert q(x_bf16).quantized.dtype == torch.bfloat16


def test_config_rebuilds_same_quantizer():
    torch.manual_seed(0)
    q = FSQ([8, 6, 5], dim=10, channel_first=True).eval()
    rebuilt = FSQ(**q.config).eval()
    rebuilt.load_state_dict(q.state_dict())
    assert q.config == {"levels": [8, 6, 5], "dim": 10, "channel_first": True, "check_finite": True, "eps": 1e-3}
    x = _seeded(2, 10, 3)
    assert torch.equal(rebuilt(x).quantized, q(x).quantized)
