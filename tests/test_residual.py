import pytest
import torch

from vqlib import ResidualVQ, VectorQuantize

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


# ---- every VectorQuantize codebook option, incl. residual SimVQ and the rotation trick ---------------------------
def test_accepts_every_codebook_option_of_vector_quantize():
    import inspect

    from vqlib.core.settings import CodebookSettings

    vq_params = set(inspect.signature(VectorQuantize.__init__).parameters) - {"self"}
    rvq_params = set(inspect.signature(ResidualVQ.__init__).parameters) | set(CodebookSettings.names())
    # heads are VectorQuantize's layout, not a codebook option: each residual level codes one vector
    assert vq_params - {"heads", "separate_codebook_per_head"} <= rvq_params
    options = dict(distance="cosine", codebook_update="gradient", decay=0.9, eps=1e-4, reparam="simvq",
                   kmeans_iters=3, usage_window=7, gradient_estimator="rotation", commitment_weight=0.5,
                   codebook_weight=2.0, search_max_elements=256, search_backend="torch")  # fmt: skip
    rvq = ResidualVQ(DIM, 32, 3, **options)
    for level in rvq.levels:
        assert level.settings == rvq.settings == CodebookSettings(**options)
        cb = level.codebooks[0]
        assert (cb.reparam, cb.search_backend, cb.search_max_elements, cb.cosine) == ("simvq", "torch", 256, True)
    assert ResidualVQ(DIM, 32, 3, settings=CodebookSettings(**options)).settings == rvq.settings
    with pytest.raises(TypeError, match="not both"):
        ResidualVQ(DIM, 32, 3, settings=CodebookSettings(**options), decay=0.5)
    with pytest.raises(TypeError, match="unknown codebook option.*'heads'"):
        ResidualVQ(DIM, 32, 3, heads=2)
    with pytest.raises(ValueError, match="codebook_update='gradient'"):
        ResidualVQ(DIM, 32, 3, reparam="simvq")


def test_config_round_trip_keeps_every_option():
    from vqlib import quantizer_from_config, quantizer_to_config

    rvq = ResidualVQ(DIM, 32, 3, reparam="simvq", codebook_update="gradient", gradient_estimator="rotation")
    again = quantizer_from_config(quantizer_to_config(rvq))
    assert again.settings == rvq.settings
    again.load_state_dict(rvq.state_dict())
    x = data(20, DIM)
    assert torch.equal(again.eval()(x).quantized, rvq.eval()(x).quantized)


@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_residual_simvq_trains_and_round_trips_exactly(estimator):
    torch.manual_seed(0)
    rvq = ResidualVQ(DIM, 64, 3, reparam="simvq", codebook_update="gradient", gradient_estimator=estimator)
    bases = [level.codebooks[0].basis.clone() for level in rvq.levels]
    opt = torch.optim.Adam(rvq.parameters(), lr=3e-2)
    x = data(256, DIM)
    losses = []
    for step in range(10):
        out = rvq(x)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for level in rvq.levels:  # every level's map learns (SimVQ: the map moves the whole codebook)
                assert level.codebooks[0].proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    for level, basis in zip(rvq.levels, bases):
        assert torch.equal(level.codebooks[0].basis, basis)  # frozen basis
    rvq.eval()
    with torch.no_grad():
        for n in (1, 3):
            ev = rvq(x, num_quantizers=n)
            assert torch.equal(rvq.decode(ev.indices), ev.quantized)
            assert torch.equal(rvq.decode(rvq.encode(x, num_quantizers=n)), ev.quantized)


def test_rotation_trick_changes_the_encoder_gradient_not_the_value():
    x = data(40, DIM)
    grads, values = {}, {}
    for est in ("ste", "rotation"):
        rvq = ResidualVQ(DIM, 32, 2, gradient_estimator=est, commitment_weight=0.0).eval()
        xi = x.clone().requires_grad_(True)
        out = rvq(xi)
        (out.quantized * torch.arange(DIM).float()).sum().backward()
        grads[est], values[est] = xi.grad, out.quantized.detach()
    assert torch.equal(values["ste"], values["rotation"])
    assert torch.isfinite(grads["rotation"]).all() and not torch.allclose(grads["ste"], grads["rotation"])
