"""The compiled GPTQ column loop (one codebook, CPU) against the torch loop it replaces."""

import pytest
import torch

from vqlib.compress import VQConfig, gptq_loop
from vqlib.compress.calibrated import gptq_vq


def layer(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    x = torch.randn(4 * in_features, in_features, generator=gen) * (torch.rand(in_features, generator=gen) + 0.1)
    return w, x.T @ x / x.shape[0]


def both_loops(monkeypatch, w, h, cfg):
    compiled = gptq_vq(w, h, cfg, seed=0)
    with monkeypatch.context() as m:
        m.setattr(gptq_loop, "MAX_CODES", 0)  # every block takes the torch loop
        reference = gptq_vq(w, h, cfg, seed=0)
    return compiled, reference


@pytest.mark.parametrize(
    "fmt",
    [
        dict(vector_dim=4, codebook_bits=4, group_size=32),
        dict(vector_dim=2, codebook_bits=5, group_size=None, scale_granularity="group", scale_group_size=16),
        dict(vector_dim=8, codebook_bits=4, group_size=None, act_order=True),
        dict(vector_dim=3, codebook_bits=4, group_size=None),
    ],
)
def test_same_codes_and_weights_as_the_torch_loop(monkeypatch, fmt):
    w, h = layer(40, 48, seed=1)
    cfg = VQConfig(**fmt, block_size=24, kmeans_iters=5, finetune_steps=0)
    assert gptq_loop.compiled_loop_applies(w, torch.zeros(1, 1, 16, 4))
    compiled, reference = both_loops(monkeypatch, w, h, cfg)
    # Random data has no exact ties: the exact squared distances and the torch loop's GEMM form agree.
    assert torch.equal(compiled.codes, reference.codes)
    torch.testing.assert_close(compiled.codebooks, reference.codebooks, rtol=1e-5, atol=1e-6)


def test_not_for_several_codebooks_or_large_ones():
    w = torch.zeros(4, 8)
    assert not gptq_loop.compiled_loop_applies(w, torch.zeros(1, 2, 256, 4))  # M = 2: torch loop
    assert not gptq_loop.compiled_loop_applies(w, torch.zeros(1, 1, 4096, 4))  # 2**12 entries
    assert not gptq_loop.compiled_loop_applies(w.to("meta"), torch.zeros(1, 1, 16, 4))
    assert not gptq_loop.compiled_loop_applies(w.double(), torch.zeros(1, 1, 16, 4))  # float32 only


def test_same_result_on_one_and_two_threads():
    w, h = layer(300, 64, seed=2)
    cfg = VQConfig(vector_dim=4, codebook_bits=6, group_size=None, kmeans_iters=4, finetune_steps=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gptq_vq(w, h, cfg, seed=0)
        torch.set_num_threads(2)
        two = gptq_vq(w, h, cfg, seed=0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.codebooks, two.codebooks)
