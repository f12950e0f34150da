import pytest
import torch

from vqlib.core.kmeans import kmeans


def blobs(n_per=200, k=8, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=gen) * 10
    x = centers.repeat_interleave(n_per, 0) + 0.01 * torch.randn(k * n_per, d, generator=gen)
    return x, centers


def objective(x, c, w=None):
    d = torch.cdist(x, c).min(1).values ** 2
    return float(d.sum() if w is None else (d * w).sum())


def test_objective_never_increases_and_blobs_are_covered():
    x, centers = blobs()
    objectives = [objective(x, kmeans(x, 16, num_iters=it, seed=0)) for it in (0, 1, 3, 10)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:]))
    c = kmeans(x, 16, num_iters=10, seed=0)
    assert torch.cdist(centers, c).min(1).values.max() < 0.05  # every true centre has a centroid on it


def test_weights_pull_the_centroid():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    w = torch.tensor([1.0, 3.0, 0.0, 1.0])
    c = kmeans(x, 2, num_iters=10, seed=0, weights=w).sort(0).values
    assert torch.allclose(c, torch.tensor([[0.75], [11.0]]))


def test_no_centroid_is_wasted_when_clusters_empty():
    # 5 distinct points, 5 clusters, a start with duplicates is impossible, but Lloyd steps can
    # still empty a cluster on tied data: the result must represent every point exactly.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [9.0, 9.0]]).repeat(20, 1)
    c = kmeans(x, 5, num_iters=10, seed=3)
    assert objective(x, c) == pytest.approx(0.0, abs=1e-8)


def test_warm_start_from_a_neighbouring_solution_needs_fewer_iterations():
    # Two draws of the same distribution (as two codebook groups of one layer): the first's
    # centroids start the second better than random rows do, at the same iteration count.
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4000, 4, generator=gen), torch.randn(4000, 4, generator=gen)
    first = kmeans(a, 64, num_iters=25, seed=0)
    warm = kmeans(b, 64, num_iters=1, seed=0, init=first)
    cold = kmeans(b, 64, num_iters=1, seed=0)
    assert objective(b, warm) < 0.97 * objective(b, cold)
    assert torch.equal(kmeans(b, 64, num_iters=0, init=first), first)  # zero iterations: the start itself
    with pytest.raises(ValueError, match=r"init must have shape \(64, 4\)"):
        kmeans(b, 64, init=first[:10])


def test_spherical_centroids_are_unit_vectors():
    x = torch.nn.functional.normalize(torch.randn(500, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    c = kmeans(x, 16, num_iters=5, seed=0, spherical=True)
    assert torch.allclose(c.norm(dim=1), torch.ones(16), atol=1e-5)


def test_same_start_and_result_as_faiss_kmeans():
    faiss = pytest.importorskip("faiss")
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(2))
    w = torch.rand(4096, generator=torch.Generator().manual_seed(3))
    for iters in (0, 10):
        km = faiss.Kmeans(4, 64, niter=iters, seed=7, max_points_per_centroid=10**6, min_points_per_centroid=1)
        km.train(x.numpy(), weights=w.numpy())
        ours = kmeans(x, 64, num_iters=iters, seed=7, weights=w)
        if iters == 0:
            assert torch.equal(ours, torch.from_numpy(km.centroids))
        else:
            ref = objective(x, torch.from_numpy(km.centroids), w)
            assert objective(x, ours, w) == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(10),), "2-d tensor"),
        ((torch.randn(3, 2),), "at least as many vectors as clusters"),
        ((torch.randn(10, 2), dict(weights=torch.ones(9))), r"weights must have shape \(10,\)"),
        ((torch.randn(10, 2), dict(weights=-torch.ones(10))), "non-negative"),
    ],
)
def test_bad_input(args, message):
    x, kwargs = args[0], (args[1] if len(args) > 1 else {})
    with pytest.raises(ValueError, match=message):
        kmeans(x, 4, **kwargs)
