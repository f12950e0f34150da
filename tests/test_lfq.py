import math

import pytest
import torch

from vqlib.lfq import LFQ


def _seeded(*shape, scale=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize(
    "dim, size, channel_first, spherical, shape",
    [
        (8, 2**8, False, False, (2, 7, 8)),
        (16, 2**10, False, False, (3, 5, 16)),
        (10, 2**10, True, False, (2, 10, 3, 4)),
        (24, 2**12, True, True, (2, 24, 3, 2, 2)),
        (6, 2**6, False, True, (4, 6)),
    ],
)
def test_decode_equals_quantized_in_eval(dim, size, channel_first, spherical, shape):
    torch.manual_seed(0)
    q = LFQ(dim, size, channel_first=channel_first, spherical=spherical).eval()
    x = _seeded(*shape)
    out = q(x)
    assert out.quantized.shape == x.shape and out.quantized.dtype == x.dtype
    token_shape = (shape[0], *shape[2:]) if channel_first else shape[:-1]
    assert out.indices.shape == token_shape and out.indices.dtype == torch.int64
    assert torch.equal(q.decode(out.indices), out.quantized)
    assert torch.equal(q.train()(x).quantized, out.quantized)  # straight-through value is exact


def test_index_is_sign_bits_most_significant_first():
    q = LFQ(4, 16)
    out = q(torch.tensor([[0.3, -2.0, 1.0, 0.1], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 5.0]]))
    assert out.indices.tolist() == [0b1011, 0, 1]  # sign(0) is -1
    assert torch.equal(out.quantized[0], torch.tensor([1.0, -1.0, 1.0, 1.0]))
    all_codes = q.indices_to_codes(torch.arange(16))
    assert torch.unique(all_codes, dim=0).shape[0] == 16 and set(all_codes.unique().tolist()) == {-1.0, 1.0}
    # codebook_scale scales the codes.
    assert torch.equal(
        LFQ(4, 16, codebook_scale=0.5).decode(torch.tensor([0b1000])), torch.tensor([[0.5, -0.5, -0.5, -0.5]])
    )


def test_indices_unique_per_distinct_code():
    q = LFQ(8, 2**8).eval()
    out = q(_seeded(3000, 8))
    assert 0 <= out.indices.min() and out.indices.max() < 256
    distinct = torch.unique(out.quantized, dim=0).shape[0]
    pairs = torch.cat([out.quantized, out.indices[:, None].float()], dim=1)
    assert torch.unique(pairs, dim=0).shape[0] == distinct == torch.unique(out.indices).numel() > 200


def test_huge_codebook_is_never_enumerated():
    # 2^40 codes: enumerating them (even as indices) is impossible; groups of 9 bits keep the entropy cheap.
    torch.manual_seed(0)
    q = LFQ(64, 2**40, spherical=True)
    x = _seeded(32, 64).requires_grad_(True)
    out = q(x)
    assert torch.isfinite(out.loss) and out.indices.max() < 2**40
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(q.eval().decode(out.indices), q(x).quantized)


def _brute_force_entropies(z, temperature):
    """Exact entropies over the full 2^K codebook (only for tiny K)."""
    k = z.shape[1]
    bits = (torch.arange(2**k)[:, None] >> torch.arange(k - 1, -1, -1)) & 1
    codes = bits.float() * 2 - 1
    probs = (-(torch.cdist(z, codes) ** 2) / temperature).softmax(dim=-1)
    per_sample = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    avg = probs.mean(0)
    return per_sample, -(avg * avg.clamp_min(1e-30).log()).sum()


def test_entropies_match_full_codebook_and_groups_bound_it():
    z = _seeded(400, 6, scale=0.3) + 0.2
    full = LFQ(6, 64, temperature=0.5, commitment_weight=0.0)(z).metrics
    per_sample, codebook = _brute_force_entropies(z, 0.5)
    torch.testing.assert_close(full["per_sample_entropy"], per_sample)
    torch.testing.assert_close(full["codebook_entropy"], codebook)
    # Groups of 2 bits: per-sample entropy is still exact (the softmax factorises over bits);
    # codebook entropy is the factorised upper bound.
    grouped = LFQ(6, 64, temperature=0.5, entropy_group_bits=2)(z).metrics
    torch.testing.assert_close(grouped["per_sample_entropy"], per_sample)
    assert grouped["codebook_entropy"] > codebook + 1e-3
    assert grouped["codebook_entropy"] <= 6 * math.log(2) + 1e-5


def _usage_after_entropy_training(diversity_weight, spherical, entropy_group_bits, temperature):
    """Start collapsed (a large bias puts every token on one code) and train project_in on the entropy loss."""
    torch.manual_seed(0)
    q = LFQ(
        16,
        2**8,
        entropy_weight=1.0,
        commitment_weight=0.0,
        diversity_weight=diversity_weight,
        spherical=spherical,
        entropy_group_bits=entropy_group_bits,
        temperature=temperature,
    )
    with torch.no_grad():
        q.project_in.bias.fill_(2.0)
    x = _seeded(512, 16)
    before = q(x).metrics["batch_usage"].item()
    opt = torch.optim.Adam(q.project_in.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        q(x).loss.backward()
        opt.step()
    return before, q(x).metrics["batch_usage"].item()


# LFQ with the default temperature 0.01 and |z| ~ 2 has saturated soft assignments (logits ~ 4|z|/T = 800),
# so its entropy gradient is tiny from such a collapse (as in the reference formulation); 0.1 shows the mechanism.
@pytest.mark.parametrize(
    "spherical, entropy_group_bits, temperature", [(False, 9, 0.1), (True, 9, 0.01), (False, 3, 0.1), (True, 3, 0.01)]
)
def test_entropy_loss_undoes_codebook_collapse(spherical, entropy_group_bits, temperature):
    before, after = _usage_after_entropy_training(1.0, spherical, entropy_group_bits, temperature)
    _, without_diversity = _usage_after_entropy_training(0.0, spherical, entropy_group_bits, temperature)
    assert before <= 4 / 256  # collapsed start: at most 4 of 256 codes used
    assert after >= 0.3, (before, after)
    assert without_diversity <= 0.05, (before, without_diversity)


def test_bsq_codes_have_unit_norm():
    q = LFQ(12, 2**12, spherical=True).eval()
    codes = q.indices_to_codes(torch.randint(0, 2**12, (100,)))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(100))
    out = q(_seeded(50, 12, scale=5.0))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(50))
    with pytest.raises(ValueError, match="codebook_scale=1.0, got 2.0"):
        LFQ(12, 2**12, spherical=True, codebook_scale=2.0)


def test_gradients_straight_through_and_projections():
    q = LFQ(8, 2**8)
    x = _seeded(5, 8).requires_grad_(True)
    q(x).quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity straight-through
    torch.manual_seed(0)
    q = LFQ(16, 2**8)
    x = _seeded(20, 16).requires_grad_(True)
    out = q(x)
    (out.quantized.square().sum() + out.loss).backward()
    for grad in (x.grad, q.project_in.weight.grad, q.project_out.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("spherical", [False, True])
def test_mask_excludes_tokens_from_loss_and_metrics(spherical):
    torch.manual_seed(0)
    q = LFQ(16, 2**10, spherical=spherical, entropy_group_bits=5, temperature=0.3)
    x = _seeded(2, 30, 16).requires_grad_(True)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :12] = mask[1, :7] = True
    out = q(x, mask=mask)
    ref = q(x.detach()[mask])
    torch.testing.assert_close(out.loss, ref.loss)
    assert out.metrics.keys() == ref.metrics.keys()
    for key in ref.metrics:
        torch.testing.assert_close(out.metrics[key], ref.metrics[key])
    assert not torch.allclose(q(x).loss, out.loss)
    out.loss.backward()
    assert x.grad[~mask].abs().max() == 0 and x.grad[mask].abs().sum() > 0
    nothing = q(x, mask=torch.zeros(2, 30, dtype=torch.bool))
    assert nothing.loss.item() == 0.0 and torch.isfinite(nothing.loss)


def test_bad_inputs_and_options():
    with pytest.raises(ValueError, match=r"power of two \(e.g. 64 or 128\), got 100"):
        LFQ(8, 100)
    with pytest.raises(ValueError, match="power of two >= 2"):
        LFQ(8, 1)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        LFQ(8, 2**63)
    with pytest.raises(ValueError, match="temperature > 0"):
        LFQ(8, 256, temperature=0.0)
    with pytest.raises(ValueError, match="entropy_group_bits >= 1"):
        LFQ(8, 256, entropy_group_bits=0)
    q = LFQ(8, 256)
    with pytest.raises(ValueError, match="expected 8 features on the last dim, got 4"):
        q(torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        LFQ(8, 256, channel_first=True)(torch.randn(8))
    bad = torch.randn(2, 8)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        q(bad)
    LFQ(8, 256, check_finite=False)(torch.randn(2, 8))
    with pytest.raises(IndexError, match=r"\[0, 255\].*max 256"):
        q.decode(torch.tensor([256]))
    with pytest.raises(IndexError, match="min -3"):
        q.decode(torch.tensor([-3]))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.tensor([1.5]))
    with pytest.raises(TypeError, match="bool"):
        q(torch.randn(2, 8), mask=torch.ones(2))


@pytest.mark.parametrize("spherical", [False, True])
def test_autocast_bf16_forward_backward(spherical):
    torch.manual_seed(0)
    q = LFQ(32, 2**12, spherical=spherical, channel_first=True, entropy_group_bits=6)
    x = _seeded(2, 32, 4, 4).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = q(x)
        assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
        (out.quantized.square().mean() + out.loss).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(q.project_in.weight.grad).all()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert q(x.detach().to(torch.bfloat16)).quantized.dtype == torch.bfloat16


def test_config_rebuilds_same_quantizer():
    torch.manual_seed(0)
    q = LFQ(10, 2**6, spherical=True, entropy_weight=0.2).eval()
    rebuilt = LFQ(**q.config).eval()
    rebuilt.load_state_dict(q.state_dict())
    assert q.config["codebook_size"] == 64 and q.config["spherical"] is True
    x = _seeded(4, 10)
    a, b = q(x), rebuilt(x)
    assert torch.equal(a.quantized, b.quantized) and torch.equal(a.loss, b.loss)
