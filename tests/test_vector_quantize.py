import pytest
import torch
import torch.nn.functional as F

from vqlib import VectorQuantize

DIM = 16


def data(*shape, seed=11):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def clustered(n, centers, seed=12, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(centers.shape[0], (n,), generator=g)
    return centers[which] + noise * torch.randn(n, centers.shape[1], generator=g)


LAYOUTS = [
    dict(),
    dict(distance="cosine"),
    dict(codebook_dim=4),
    dict(heads=4),
    dict(heads=2, separate_codebook_per_head=True, codebook_dim=6),
    dict(codebook_update="gradient"),
    dict(codebook_update="frozen"),
    dict(reparam="simvq", codebook_update="gradient"),
    dict(gradient_estimator="rotation"),
    dict(kmeans_init=True, dead_code_window=1),
]


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
@pytest.mark.parametrize("channel_first", [False, True])
def test_round_trip_and_training_step(kwargs, channel_first):
    torch.manual_seed(0)
    vq = VectorQuantize(DIM, 64, channel_first=channel_first, **kwargs)
    x = data(2, DIM, 5, 3) if channel_first else data(2, 5, 3, DIM)
    x.requires_grad_(True)
    out = vq(x)
    q, idx, loss = out  # unpacks as a 3-tuple
    assert q.shape == x.shape and q.dtype == x.dtype
    heads = kwargs.get("heads", 1)
    tokens = (2, 5, 3)
    assert idx.shape == (tokens if heads == 1 else (*tokens, heads)) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 64
    (loss + q.square().mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for key in ("perplexity", "batch_usage", "usage", "dead_codes"):
        assert key in out.metrics and not out.metrics[key].requires_grad
    vq.eval()
    with torch.no_grad():
        ev = vq(x)
        assert torch.equal(vq.decode(ev.indices), ev.quantized)


def test_straight_through_value_is_the_code_and_gradient_is_identity():
    vq = VectorQuantize(DIM, 32, commitment_weight=0.0, codebook_update="frozen")
    x = data(50, DIM).requires_grad_(True)
    out = vq(x)
    vq.eval()
    assert torch.equal(out.quantized, vq.decode(out.indices))  # value is exactly the (pre-update) code
    out.quantized.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_rotation_trick_gradient_differs_from_straight_through():
    x = data(40, DIM)
    grads = {}
    for est in ("ste", "rotation"):
        vq = VectorQuantize(DIM, 32, gradient_estimator=est, commitment_weight=0.0).eval()
        xi = x.clone().requires_grad_(True)
        out = vq(xi)
        assert torch.equal(out.quantized, vq.decode(out.indices))
        (out.quantized * torch.arange(DIM).float()).sum().backward()
        grads[est] = xi.grad
    assert not torch.allclose(grads["ste"], grads["rotation"])
    # the rotation maps x onto q, so <grad, x> scaled equals the weighting applied to q
    assert torch.isfinite(grads["rotation"]).all()


def test_commitment_and_codebook_losses():
    x = data(64, DIM)
    vq = VectorQuantize(DIM, 16, commitment_weight=0.5, codebook_update="frozen").eval()
    out = vq(x)
    assert torch.allclose(out.loss, 0.5 * F.mse_loss(x, out.quantized))
    vq = VectorQuantize(DIM, 16, commitment_weight=0.5, codebook_weight=2.0, codebook_update="gradient").eval()
    out = vq(x)
    assert torch.allclose(out.loss, 2.5 * F.mse_loss(x, out.quantized))
    out.loss.backward()
    assert vq.codebooks[0].embed.grad.abs().sum() > 0


def test_ema_update_matches_the_formula():
    decay, eps, k = 0.9, 1e-5, 8
    vq = VectorQuantize(DIM, k, decay=decay, eps=eps)
    cb = vq.codebooks[0]
    embed0 = cb.embed.clone()
    x = data(100, DIM)
    idx = vq(x).indices
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, DIM).index_add_(0, idx, x)
    size = decay * torch.ones(k) + (1 - decay) * counts
    avg = decay * embed0 + (1 - decay) * sums
    n = size.sum()
    expected = avg / ((size + eps) / (n + k * eps) * n)[:, None]
    assert torch.allclose(cb.embed, expected, atol=1e-6)


def test_frozen_codebook_never_changes():
    vq = VectorQuantize(DIM, 32, codebook_update="frozen")
    before = vq.codebook.clone()
    for s in range(3):
        vq(data(64, DIM, seed=s))
    assert torch.equal(before, vq.codebook)


def test_simvq_step_moves_every_code():
    vq = VectorQuantize(DIM, 256, reparam="simvq", codebook_update="gradient")
    opt = torch.optim.SGD(vq.parameters(), lr=0.1)
    before = vq.codebook.clone()
    out = vq(data(20, DIM))  # 20 tokens use at most 20 of 256 codes
    out.loss.backward()
    opt.step()
    moved = (vq.codebook - before).abs().sum(-1) > 0
    assert moved.all(), f"only {int(moved.sum())} of 256 codes moved"
    assert torch.equal(vq.codebooks[0].basis, vq.codebooks[0].basis.clone())  # basis is a frozen buffer
    assert not any(p is vq.codebooks[0].basis for p in vq.parameters())


def test_projector_reparam_keeps_features_frozen_and_learns_projection():
    feats = data(128, 24, seed=3)
    vq = VectorQuantize(DIM, 128, reparam="projector", codebook_update="gradient", init_codebook=feats)
    assert torch.equal(vq.codebooks[0].basis, feats)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-2)
    centers = data(8, DIM, seed=4)
    losses = []
    for step in range(40):
        out = vq(clustered(256, centers, seed=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert torch.equal(vq.codebooks[0].basis, feats)
    assert losses[-1] < 0.5 * losses[0]


def test_kmeans_init_finds_the_clusters():
    centers = data(8, DIM, seed=5) * 3
    x = clustered(2000, centers)
    vq = VectorQuantize(DIM, 32, kmeans_init=True, kmeans_iters=20)
    random_init = torch.cdist(centers, vq.codebook).min(-1).values
    out = vq(x)
    # every center has a code right next to it (random codes are far from all of them)
    d = torch.cdist(centers, vq.codebook).min(-1).values
    assert (random_init > 1.0).all() and (d < 0.2).all(), d
    assert float(out.metrics["perplexity"]) > 7.0


def test_dead_codes_are_restarted_from_inputs():
    centers = data(32, DIM, seed=6) * 3
    results = {}
    for window in (0, 2):
        torch.manual_seed(0)
        # codes start far away from the data so most are never chosen
        init = data(64, DIM, seed=7) + 20.0
        vq = VectorQuantize(DIM, 64, init_codebook=init, dead_code_window=window)
        for step in range(12):
            vq(clustered(512, centers, seed=step))
        vq.eval()
        out = vq(clustered(4096, centers, seed=99))
        results[window] = int(out.indices.unique().numel())
    assert results[0] <= 2
    assert results[2] >= 30, results


def test_mask_excludes_padding_from_codebook_updates():
    x = data(2, 10, DIM)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 6:] = False
    a = VectorQuantize(DIM, 16)
    b = VectorQuantize(DIM, 16)
    poisoned = x.clone()
    poisoned[~mask] = 1e3  # padding values must not reach the codebook
    oa = a(poisoned, mask=mask)
    b(x[mask])
    assert torch.allclose(a.codebook, b.codebook)
    assert torch.isfinite(oa.loss) and oa.loss < 100  # padding (1e3) is not in the loss either
    ref = b.eval()(x[mask])
    a.eval()
    assert torch.allclose(a(poisoned, mask=mask).loss, ref.loss, atol=1e-6)


def test_autocast_bf16_training_stays_finite_and_fp32_codebook():
    torch.manual_seed(0)
    enc = torch.nn.Linear(DIM, DIM)
    vq = VectorQuantize(DIM, 128, kmeans_init=True, dead_code_window=2)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-3)
    for step in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = enc(data(256, DIM, seed=step))
            assert h.dtype == torch.bfloat16
            out = vq(h)
            loss = out.loss + out.quantized.float().square().mean()
        assert out.quantized.dtype == torch.bfloat16
        assert torch.isfinite(out.quantized.float()).all() and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cb = vq.codebooks[0]
    assert cb.embed.dtype == torch.float32 and cb.embed_avg.dtype == torch.float32
    assert torch.isfinite(cb.embed).all()


def test_bad_input_errors():
    vq = VectorQuantize(DIM, 32)
    with pytest.raises(ValueError, match=f"expected {DIM} features.*got 15"):
        vq(torch.randn(4, 15))
    with pytest.raises(ValueError, match="channel_first"):
        VectorQuantize(DIM, 32, channel_first=True)(torch.randn(DIM))
    with pytest.raises(TypeError, match="floating point"):
        vq(torch.ones(4, DIM, dtype=torch.long))
    x = torch.randn(4, DIM)
    x[1, 2] = float("nan")
    before = vq.codebook.clone()
    with pytest.raises(ValueError, match="finite"):
        vq(x)
    assert torch.equal(before, vq.codebook)
    with pytest.raises(IndexError, match=r"\[0, 31\].*max 32"):
        vq.decode(torch.tensor([0, 32]))
    with pytest.raises(IndexError, match="min -1"):
        vq.decode(torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="integer"):
        vq.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="heads"):
        VectorQuantize(DIM, 32, heads=4).decode(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="mask"):
        vq(torch.randn(4, DIM), mask=torch.ones(5, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reparam="simvq"), "codebook_update='gradient'"),
        (dict(reparam="simvq", codebook_update="gradient", kmeans_init=True), "kmeans_init"),
        (dict(codebook_update="frozen", dead_code_window=5), "dead_code_window"),
        (dict(reparam="projector", codebook_update="gradient"), "init_codebook"),
        (dict(distance="manhattan"), "distance"),
        (dict(heads=3), "divisible"),
        (dict(decay=1.5), "decay"),
        (dict(init_codebook=torch.zeros(3, 3)), "init_codebook"),
    ],
)
def test_incompatible_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantize(DIM, 32, **kwargs)


def test_large_codebook_forward_backward():
    vq = VectorQuantize(32, 65536, reparam="simvq", codebook_update="gradient")
    x = data(1024, 32).requires_grad_(True)
    out = vq(x)
    out.loss.backward()
    assert vq.codebooks[0].proj.weight.grad is not None
    assert out.indices.max() < 65536
