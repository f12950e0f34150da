"""The output memo of block calibration: reuses a compressed layer's output only for a bit-identical,
unmodified input, and leaves every compression result bit-identical."""

import pytest
import torch
from test_compress_blockwise import CFG, dequantized, tiny_llama, token_batches
from torch import nn

from vqlib.compress import VQConfig, compress
from vqlib.compress import output_memo as memo_module
from vqlib.compress.output_memo import OutputMemo


def counted_linear():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    calls = []
    layer.register_forward_pre_hook(lambda m, a: calls.append(1))
    return layer, calls


@torch.no_grad()
def test_reuses_only_identical_unmodified_inputs():
    layer, calls = counted_linear()
    memo = OutputMemo()
    memo.watch(layer)
    x = torch.randn(3, 8)
    y0 = memo.run(0, lambda: layer(x.clone()))
    y1 = memo.run(0, lambda: layer(x.clone()))  # equal input, new tensor: reused
    assert y1 is y0 and memo.hits == 1
    assert memo.run(1, lambda: layer(x.clone())) is not y0  # another batch: computed
    x2 = x.clone()
    x2[0, 0] += 1e-6
    y2 = memo.run(0, lambda: layer(x2))  # a different input: computed, and replaces the entry
    assert torch.equal(y2, nn.functional.linear(x2, layer.weight, layer.bias))
    y2.mul_(2)  # modified in place after it was kept: never handed out again
    y3 = memo.run(0, lambda: layer(x2.clone()))
    assert y3 is not y2 and torch.equal(y3, nn.functional.linear(x2, layer.weight, layer.bias))
    assert memo.hits == 1 and memo.misses == 4


def test_computes_outside_passes_with_autograd_and_after_close():
    layer, calls = counted_linear()
    memo = OutputMemo()
    memo.watch(layer)
    x = torch.randn(2, 8)
    with torch.no_grad():
        memo.run(0, lambda: layer(x))
        layer(x)  # outside run(): no batch index, computed
    y = memo.run(0, lambda: layer(x))  # autograd on: computed, so gradients flow
    assert y.requires_grad and memo.hits == 0
    memo.close()
    assert "forward" not in layer.__dict__ and not memo.entries
    with torch.no_grad():
        memo.run(0, lambda: layer(x))
    assert len(calls) == 4


@torch.no_grad()
def test_budget_bounds_the_kept_bytes():
    layer, _ = counted_linear()
    x = torch.randn(5, 8)
    entry_bytes = x.numel() * 4 + 5 * 4 * 4
    memo = OutputMemo(budget_bytes=entry_bytes)
    memo.watch(layer)
    memo.run(0, lambda: layer(x))
    memo.run(1, lambda: layer(x))  # over the budget: not kept
    assert memo.used == entry_bytes and len(memo.entries) == 1
    memo.run(1, lambda: layer(x))
    assert memo.hits == 0


@pytest.mark.parametrize("original_target", [True, False])
def test_compression_is_bit_identical_with_and_without_the_memo(monkeypatch, original_target):
    cfg = VQConfig(**CFG, original_output_target=original_target)
    batches = token_batches()
    with_memo = dequantized(compress(tiny_llama(), cfg, calibration=batches)[0])
    hits = []
    real_close = OutputMemo.close

    def close(self):
        hits.append(self.hits)
        real_close(self)

    monkeypatch.setattr(OutputMemo, "close", close)
    monkeypatch.setattr(memo_module, "MEMO_BUDGET_BYTES", 0)
    without = dequantized(compress(tiny_llama(), cfg, calibration=batches)[0])
    assert hits and set(hits) == {0}  # nothing kept with no budget
    assert without.keys() == with_memo.keys()
    for name in with_memo:
        assert torch.equal(with_memo[name], without[name]), name


def test_layers_reused_per_block_and_batch(monkeypatch):
    """Per batch of a 7-layer Llama block: q/k/v reused in the gate/up, down and advance passes, o in
    the down and advance passes, gate/up in the advance pass: 3 x 3 + 2 + 2 = 13 reused, 7 computed
    (each layer once). The last block does not advance: 7 reused, 6 computed."""
    batches = token_batches()
    hits = []
    real_close = OutputMemo.close

    def close(self):
        hits.append((self.hits, self.misses))
        real_close(self)

    monkeypatch.setattr(OutputMemo, "close", close)
    compress(tiny_llama(), VQConfig(**CFG), calibration=batches)
    assert hits == [(13 * 3, 7 * 3), (13 * 3, 7 * 3), (7 * 3, 6 * 3)]  # 3 blocks, 3 batches
