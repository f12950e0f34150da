"""The fused CPU Lloyd step: exact nearest centroids (first on ties), the same weighted sums as the
bincount update, the same result on 1 and 2 threads, and a loud fallback when numba cannot run."""

import pytest
import torch

from vqlib.core import kmeans as kmeans_module
from vqlib.core import lloyd
from vqlib.core.kmeans import kmeans


def brute_force(x, c):
    return torch.cdist(x.double(), c.double()).argmin(1)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 37, 5000])
def test_nearest_centroid_matches_brute_force(d, n):
    gen = torch.Generator().manual_seed(d * 1000 + n)
    x, c = torch.randn(n, d, generator=gen), torch.randn(300, d, generator=gen)
    assert lloyd.fused_lloyd_applies(x, c)
    assign, sums = lloyd.lloyd_step(x, c)
    assert sums is None and assign.dtype == torch.int64
    dist = torch.cdist(x.double(), c.double())
    # Exact up to float32 rounding of near-ties: the chosen centroid is never measurably farther.
    chosen = dist.gather(1, assign[:, None])[:, 0]
    assert torch.all(chosen - dist.min(1).values <= 1e-5 * (1 + dist.min(1).values))
    assert (assign == brute_force(x, c)).float().mean() > 0.999


def test_ties_go_to_the_first_centroid():
    c = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    assign, _ = lloyd.lloyd_step(x, c)
    assert assign.tolist() == [1, 0, 0]


def test_sums_equal_the_bincount_update():
    gen = torch.Generator().manual_seed(0)
    x, c, w = torch.randn(9000, 4, generator=gen), torch.randn(64, 4, generator=gen), torch.rand(9000, generator=gen)
    assign, sums = lloyd.lloyd_step(x, c, w)
    weighted = torch.cat([x * w[:, None], w[:, None]], 1).double()
    expected = kmeans_module._sums(weighted, assign, 64)
    assert sums.dtype == torch.float64 and sums.shape == (64, 5)
    torch.testing.assert_close(sums, expected, rtol=1e-12, atol=1e-9)


def test_same_result_on_one_and_two_threads():
    gen = torch.Generator().manual_seed(1)
    x, c, w = torch.randn(20000, 4, generator=gen), torch.randn(256, 4, generator=gen), torch.rand(20000, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a1, s1 = lloyd.lloyd_step(x, c, w)
        torch.set_num_threads(2)
        a2, s2 = lloyd.lloyd_step(x, c, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a1, a2) and torch.equal(s1, s2)


def test_kmeans_same_centroids_with_and_without_the_fused_step(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(4096, 4, generator=gen), torch.rand(4096, generator=gen)
    fused = kmeans(x, 32, num_iters=10, seed=3, weights=w)
    monkeypatch.setattr(lloyd, "LLOYD_MAX_DIM", 0)
    plain = kmeans(x, 32, num_iters=10, seed=3, weights=w)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def test_only_where_it_is_faster():
    assert not lloyd.fused_lloyd_applies(torch.zeros(4, 16), torch.zeros(8, 16))  # d > 8: Faiss
    assert not lloyd.fused_lloyd_applies(torch.zeros(4, 4), torch.zeros(4096, 4))  # k > 1024: Faiss
    assert not lloyd.fused_lloyd_applies(torch.zeros(4, 4, device="meta"), torch.zeros(8, 4, device="meta"))


def test_a_build_failure_warns_once_and_kmeans_still_runs(monkeypatch):
    from vqlib.core import numba_loops

    monkeypatch.setattr(numba_loops, "_loaded", {})

    def broken(name):
        raise ImportError("numba is broken here")

    monkeypatch.setattr(numba_loops.importlib, "import_module", broken)
    x = torch.randn(600, 4, generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="numba loops are unavailable.*numba is broken here.*Faiss"):
        assert not lloyd.fused_lloyd_applies(x, x[:8])
    with warnings_as_errors():
        centroids = kmeans(x, 8, num_iters=3)  # no second warning; Faiss path
    assert centroids.shape == (8, 4)


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
