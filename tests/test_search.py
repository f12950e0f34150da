import pytest
import torch

from vqlib.core.search import nearest_code


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("cosine", [False, True])
def test_chunked_search_equals_brute_force(backend, cosine):
    g = torch.Generator().manual_seed(3)
    x, codes = torch.randn(700, 32, generator=g), torch.randn(3000, 32, generator=g)
    if cosine:
        ref = (torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(codes, dim=-1).T).argmax(-1)
    else:
        ref = torch.cdist(x.double(), codes.double()).argmin(-1)
    # a tiny block budget forces many blocks (here 1 row per block)
    got = nearest_code(x, codes, cosine=cosine, max_elements=3000, backend=backend)
    assert got.dtype == torch.long and got.shape == (700,)
    assert torch.equal(got, ref)


def test_block_size_does_not_change_result():
    g = torch.Generator().manual_seed(4)
    x, codes = torch.randn(500, 16, generator=g), torch.randn(2048, 16, generator=g)
    a = nearest_code(x, codes, max_elements=2048 * 7, backend="torch")
    b = nearest_code(x, codes, max_elements=1 << 30, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_memory_is_bounded(backend):
    # 4096 tokens x 262144 codes would be 4 GiB of fp32 distances; either blocked search needs ~64 MiB.
    import resource

    g = torch.Generator().manual_seed(5)
    x, codes = torch.randn(4096, 8, generator=g), torch.randn(262144, 8, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    idx = nearest_code(x, codes, backend=backend)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1024, f"peak RSS grew by {grown_mb:.0f} MB"
    sample = torch.arange(0, 4096, 512)
    ref = torch.cdist(x[sample].double(), codes.double()).argmin(-1)
    assert torch.equal(idx[sample], ref)


def test_search_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expects x"):
        nearest_code(torch.randn(4, 8), torch.randn(10, 9))
    with pytest.raises(ValueError, match="backend"):
        nearest_code(torch.randn(4, 8), torch.randn(10, 8), backend="gpu")


def _faiss_gpu_available() -> bool:
    from vqlib.core.search import faiss_has_gpu

    return torch.cuda.is_available() and faiss_has_gpu()


def test_faiss_gpu_glue_passes_device_tensors_and_metric(monkeypatch):
    """The faiss-gpu call receives the torch tensors themselves (no host copy), the right metric and
    k=1, and its answer comes back as int64 (n,). A stand-in for faiss-gpu answers by brute force, so
    this runs without a GPU; the real call is checked by the GPU test below."""
    import sys
    import types

    from vqlib.core import search

    calls = []

    def knn_gpu(res, xq, xb, k, metric, device):
        calls.append((type(xq), type(xb), k, metric, device))
        scores = xq @ xb.T if metric == fake.METRIC_INNER_PRODUCT else -torch.cdist(xq.double(), xb.double())
        return None, scores.argmax(-1, keepdim=True).to(torch.int64)

    fake = types.SimpleNamespace(METRIC_L2=1, METRIC_INNER_PRODUCT=0, StandardGpuResources=object, knn_gpu=knn_gpu)
    contrib = types.ModuleType("faiss.contrib")
    monkeypatch.setitem(sys.modules, "faiss.contrib", contrib)
    monkeypatch.setitem(sys.modules, "faiss.contrib.torch_utils", types.ModuleType("faiss.contrib.torch_utils"))
    monkeypatch.setattr(search, "_GPU_RESOURCES", {})
    g = torch.Generator().manual_seed(6)
    x, codes = torch.randn(300, 8, generator=g), torch.randn(5000, 8, generator=g)
    for metric, ref in [
        (fake.METRIC_L2, torch.cdist(x.double(), codes.double()).argmin(-1)),
        (fake.METRIC_INNER_PRODUCT, (x @ codes.T).argmax(-1)),
    ]:
        got = search._faiss_gpu_search(fake, x, codes, metric)
        assert got.dtype == torch.long and got.shape == (300,)
        assert torch.equal(got, ref)
    assert calls == [(torch.Tensor, torch.Tensor, 1, 1, 0), (torch.Tensor, torch.Tensor, 1, 0, 0)]
    assert len(search._GPU_RESOURCES) == 1  # one resources object per device, reused


@pytest.mark.gpu
@pytest.mark.skipif(not _faiss_gpu_available(), reason="needs a CUDA device and a faiss-gpu build")
@pytest.mark.parametrize("cosine", [False, True])
def test_faiss_gpu_search_equals_torch_search(cosine):
    g = torch.Generator().manual_seed(7)
    x, codes = torch.randn(4096, 64, generator=g).cuda(), torch.randn(65536, 64, generator=g).cuda()
    got = nearest_code(x, codes, cosine=cosine, backend="faiss")
    ref = nearest_code(x, codes, cosine=cosine, backend="torch")
    assert got.is_cuda and got.dtype == torch.long
    assert (got == ref).float().mean().item() > 0.999  # ties / fp32 rounding may differ on a handful


def test_faiss_search_uses_the_blas_path_and_restores_faiss_global(monkeypatch):
    import faiss

    seen = []
    real_knn = faiss.knn

    def recording_knn(*args, **kwargs):
        seen.append(faiss.cvar.distance_compute_blas_threshold)
        return real_knn(*args, **kwargs)

    monkeypatch.setattr(faiss, "knn", recording_knn)
    before = faiss.cvar.distance_compute_blas_threshold
    g = torch.Generator().manual_seed(8)
    x, codes = torch.randn(1000, 4, generator=g), torch.randn(8192, 4, generator=g)
    got = nearest_code(x, codes, backend="faiss")
    assert torch.equal(got, torch.cdist(x.double(), codes.double()).argmin(-1))
    assert seen and seen[0] < x.shape[0]  # 1,000 queries are above the threshold: the blocked-GEMM path
    assert faiss.cvar.distance_compute_blas_threshold == before  # a Faiss global: never left changed
