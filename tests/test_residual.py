import pytest
import torch

from vqlib import ResidualVQ

DIM = 16


def data(*shape, seed=21):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("channel_first", [False, True])
def test_round_trip_any_prefix(shared, channel_first):
    rvq = ResidualVQ(DIM, 32, 4, shared_codebook=shared, channel_first=channel_first, codebook_dim=8)
    x = data(2, DIM, 7) if channel_first else data(2, 7, DIM)
    out = rvq(x)
    assert out.indices.shape == (2, 7, 4) and out.quantized.shape == x.shape
    rvq.eval()
    for n in range(1, 5):
        ev = rvq(x, num_quantizers=n)
        assert (ev.indices[..., n:] == -1).all() and (ev.indices[..., :n] >= 0).all()
        assert torch.equal(rvq.decode(ev.indices), ev.quantized)
        assert torch.equal(rvq.decode(ev.indices[..., :n]), ev.quantized)


def test_more_levels_reconstruct_better():
    rvq = ResidualVQ(DIM, 64, 4, kmeans_init=True)
    x = data(4096, DIM)
    rvq(x)  # k-means init of every level on its residual
    rvq.eval()
    errs = [float((rvq(x, num_quantizers=n).quantized - x).square().mean()) for n in range(1, 5)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_quantizer_dropout_varies_levels_deterministically():
    def run():
        rvq = ResidualVQ(DIM, 16, 6, quantizer_dropout=1.0, seed=3)
        return [int(rvq(data(32, DIM, seed=s)).metrics["num_quantizers"]) for s in range(12)]

    a, b = run(), run()
    assert a == b  # seeded by the step count: identical on every rank
    assert len(set(a)) > 2 and min(a) >= 1 and max(a) <= 6
    rvq = ResidualVQ(DIM, 16, 6, quantizer_dropout=1.0).eval()
    assert int(rvq(data(8, DIM)).metrics["num_quantizers"]) == 6  # never in eval


def test_per_level_metrics_and_nan_for_dropped_levels():
    rvq = ResidualVQ(DIM, 16, 3)
    out = rvq(data(64, DIM), num_quantizers=2)
    p = out.metrics["perplexity"]
    assert p.shape == (3,) and torch.isfinite(p[:2]).all() and torch.isnan(p[2])
    assert out.metrics["usage"].shape == (3,)


def test_gradients_reach_encoder_and_learned_codebooks():
    rvq = ResidualVQ(DIM, 16, 3, codebook_update="gradient")
    x = data(64, DIM).requires_grad_(True)
    out = rvq(x)
    (out.loss + out.quantized.sum()).backward()
    assert x.grad.abs().sum() > 0
    for level in rvq.levels:
        assert level.codebooks[0].embed.grad.abs().sum() > 0


def test_bad_input():
    rvq = ResidualVQ(DIM, 16, 3)
    with pytest.raises(ValueError, match="levels"):
        rvq.decode(torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(IndexError, match="max 16"):
        rvq.decode(torch.full((4, 3), 16))
    with pytest.raises(IndexError, match="min -2"):
        rvq.decode(torch.full((4, 3), -2))
    with pytest.raises(ValueError, match="after an unused"):
        rvq.decode(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(ValueError, match=r"num_quantizers must be in \[1, 3\]"):
        rvq(data(4, DIM), num_quantizers=4)
    with pytest.raises(ValueError, match="probability"):
        ResidualVQ(DIM, 16, 3, quantizer_dropout=2.0)
    with pytest.raises(ValueError, match="expected 16 features"):
        rvq(data(4, 8))
