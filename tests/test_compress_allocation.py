"""Bit budget (VQConfig.target_bits_per_weight): per-layer formats that never exceed the budget."""

import math

import pytest
import torch
from torch import nn

from vqlib.compress import VQConfig, VQLinear, compress
from vqlib.compress.allocation import _hull, allocate_formats, choose, loss_sensitivity

FAST = dict(kmeans_iters=3, finetune_steps=0)


class MLP(nn.Module):
    """Layers of different sizes and input scales, so that formats and salience differ."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256, bias=False)
        self.mid = nn.Linear(256, 128)
        self.down = nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            self.mid.weight.mul_(4.0)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def make(seed=0):
    torch.manual_seed(seed)
    return MLP().eval()


def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(64, 64, generator=g) for _ in range(2)]


@pytest.mark.parametrize("target", [2.5, 3.0, 3.8, 5.0])
def test_budget_is_met_and_never_exceeded(target):
    model, report = compress(make(), VQConfig(algorithm="data_free", target_bits_per_weight=target, **FAST))
    bits = report.bits_per_weight  # counted from the stored tensors of the layers compress built
    assert bits <= target
    assert target - bits < 0.6  # the budget is used (these layers' formats are 0.25-1.8 bits apart)
    formats = {r.format for r in report.compressed}
    assert all(isinstance(m, VQLinear) for m in (model.up, model.mid, model.down))
    assert all(f.startswith("d") for f in formats) and "(budget" in report.table()
    assert "weight error only (no calibration)" in report.table()


def test_salience_moves_bits_to_the_sensitive_layer():
    model = make()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plain = allocate_formats(
        model, layers, VQConfig(algorithm="calibrated", target_bits_per_weight=2.6, **FAST), batches()
    )
    assert plain.bits_per_weight <= 2.6
    with torch.no_grad():  # down's inputs get much larger (its weights do not): its errors weigh more
        model.mid.bias.fill_(5.0)
    louder = allocate_formats(
        model, layers, VQConfig(algorithm="calibrated", target_bits_per_weight=2.6, **FAST), batches()
    )
    assert louder.bits_per_weight <= 2.6
    assert louder.bits["down"] > plain.bits["down"] and louder.bits["up"] <= plain.bits["up"]


def test_greedy_knapsack_on_known_hulls():
    # layer a gains a lot from its first upgrade, b little: a is upgraded first, and nothing overflows
    hulls = {"a": _hull([(10, 100.0, 0), (20, 10.0, 1), (40, 9.0, 2)]), "b": _hull([(10, 50.0, 0), (20, 45.0, 1)])}
    assert choose(hulls, 20) == {"a": 0, "b": 0}
    assert choose(hulls, 30) == {"a": 1, "b": 0}
    assert choose(hulls, 40) == {"a": 1, "b": 1}
    assert _hull([(10, 5.0, 0), (20, 6.0, 1), (30, 1.0, 2)]) == [(10, 5.0, 0), (30, 1.0, 2)]  # dominated point dropped


def test_budget_below_the_cheapest_formats_is_an_error():
    with pytest.raises(ValueError, match="below the .* bits per weight that the cheapest"):
        compress(make(), VQConfig(algorithm="data_free", target_bits_per_weight=0.5, **FAST))
    with pytest.raises(ValueError, match="needs a VQ algorithm"):
        VQConfig(algorithm="scalar_rtn", target_bits_per_weight=3)
    with pytest.raises(ValueError, match="target_bits_per_weight"):
        VQConfig(target_bits_per_weight=-1)


def test_loss_sensitivity_follows_the_gradient_reaching_each_layer():
    transformers = pytest.importorskip("transformers")
    del transformers
    from test_compress_blockwise import tiny_llama, token_batches

    model = tiny_llama()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    base, note = loss_sensitivity(model, layers, token_batches())
    assert "loss sensitivity (40 tokens)" in note  # 2 x 23 predictions, 6 of them at padded positions
    assert all(v > 0 and math.isfinite(v) for v in base.values())
    # The same function, but v_proj of block 0 outputs 10x smaller values that o_proj scales back up:
    # the loss gradient reaching v_proj's output is 10x larger, its squared mean 100x.
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.div_(10)
        model.model.layers[0].self_attn.o_proj.weight.mul_(10)
    scaled, _ = loss_sensitivity(model, layers, token_batches())
    v, o = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"
    assert scaled[v] == pytest.approx(100 * base[v], rel=1e-3)
    assert scaled[o] == pytest.approx(base[o], rel=1e-3)


def test_loss_sensitivity_needs_language_model_batches():
    model = make()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights, note = loss_sensitivity(model, layers, batches())
    assert set(weights.values()) == {1.0} and "no input_ids" in note
