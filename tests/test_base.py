"""The Quantizer interface: encode never updates state, decode(encode(x)) equals the eval forward, layout facts
are attributes of every quantizer, and one perplexity function."""

import math

import pytest
import torch

from vqlib import FSQ, LFQ, ResidualVQ, VectorQuantize
from vqlib.base import perplexity

QUANTIZERS = {
    "vq_kmeans_dead_codes": lambda: VectorQuantize(8, 32, kmeans_init=True, dead_code_window=1),
    "vq_heads_ema": lambda: VectorQuantize(8, 16, heads=2, decay=0.5),
    "simvq": lambda: VectorQuantize(8, 64, reparam="simvq", codebook_update="gradient"),
    "rvq_dropout_kmeans": lambda: ResidualVQ(8, 16, 3, quantizer_dropout=1.0, kmeans_init=True, dead_code_window=1),
    "fsq": lambda: FSQ([5, 4, 4], dim=8),
    "lfq": lambda: LFQ(8, 64),
}
LAYOUT = {  # (num_codes_per_token, code_axis)
    "vq_kmeans_dead_codes": (1, False), "vq_heads_ema": (2, True), "simvq": (1, False),
    "rvq_dropout_kmeans": (3, True), "fsq": (1, False), "lfq": (1, False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_encode_never_updates_state_and_decodes_to_the_eval_forward(name):
    torch.manual_seed(0)
    q = QUANTIZERS[name]().train()
    x = torch.randn(2, 6, 8)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    params = [p.clone() for p in q.parameters()]
    indices = q.encode(x)
    assert q.training and all(m.training for m in q.modules())  # mode restored
    after = q.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"encode changed {key}"
    assert all(torch.equal(a, b) for a, b in zip(params, q.parameters()))
    assert (q.num_codes_per_token, q.code_axis) == LAYOUT[name] and q.channel_first is False
    assert indices.shape == ((2, 6, q.num_codes_per_token) if q.code_axis else (2, 6))
    q.eval()
    with torch.no_grad():
        out = q(x)
    assert torch.equal(indices, out.indices)
    assert torch.equal(q.decode(indices), out.quantized)


def test_encode_restores_mixed_submodule_modes():
    q = ResidualVQ(8, 16, 2, codebook_dim=4)
    q.train()
    q.project_in.eval()
    q.encode(torch.randn(3, 8))
    assert q.training and not q.project_in.training and q.levels[0].training


def test_channel_first_is_a_layout_fact():
    for q in (VectorQuantize(8, 16, channel_first=True), ResidualVQ(8, 16, 2, channel_first=True),
              FSQ([4, 4], dim=8, channel_first=True), LFQ(8, 16, channel_first=True)):  # fmt: skip
        assert q.channel_first is True
        idx = q.encode(torch.randn(2, 8, 5))
        assert idx.shape[:2] == (2, 5)


def test_perplexity_is_exp_entropy():
    counts = torch.tensor([1, 1, 2])
    p = torch.tensor([0.25, 0.25, 0.5])
    expected = math.exp(float(-(p * p.log()).sum()))
    assert float(perplexity(counts)) == pytest.approx(expected, rel=1e-6)
    assert perplexity(counts, torch.float64).dtype == torch.float64
    assert float(perplexity(torch.tensor([5, 5, 5, 5]))) == pytest.approx(4.0)


@pytest.mark.parametrize("channel_first", [False, True])
def test_channel_first_helpers_give_the_tokenizer_layout(channel_first):
    q = VectorQuantize(8, 16, heads=2, channel_first=channel_first).eval()
    z = torch.randn(2, 8, 3, 5)  # (b, dim, h, w)
    out = q.forward_channel_first(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5, 2)
    assert torch.equal(q.decode_channel_first(out.indices), out.quantized)
