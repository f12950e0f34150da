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


def test_search_memory_is_bounded():
    # 4096 tokens x 262144 codes would be 4 GiB of fp32 distances; the blocked search needs ~64 MiB.
    import resource

    g = torch.Generator().manual_seed(5)
    x, codes = torch.randn(4096, 8, generator=g), torch.randn(262144, 8, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    idx = nearest_code(x, codes, backend="torch")
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
