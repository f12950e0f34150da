"""Depth-linear (block-by-block) calibration: same result as whole-model passes, each block run a
depth-independent number of times, fallbacks for models whose blocks are not a chain."""

import copy

import pytest
import torch
from torch import nn

from vqlib.compress import VQConfig, VQLinear, compress
from vqlib.compress.blockwise import find_blocks

transformers = pytest.importorskip("transformers")

CFG = dict(vector_dim=4, codebook_bits=4, group_size=None, kmeans_iters=6, finetune_steps=4)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 101, (2, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 18:] = 0  # a padded row: padded tokens must stay out of the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def count_block_calls(model):
    counts = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def dequantized(model):
    return {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, VQLinear)}


@pytest.mark.parametrize("original_target", [True, False])
def test_blockwise_matches_whole_model_passes(original_target):
    cfg = VQConfig(**CFG, original_output_target=original_target)
    batches = token_batches()
    generic, rep_g = compress(tiny_llama(), cfg, calibration=batches, blocks=None)
    blockwise, rep_b = compress(tiny_llama(), cfg, calibration=batches)
    wg, wb = dequantized(generic), dequantized(blockwise)
    assert len(wg) == 21 and wg.keys() == wb.keys()
    # Same layer inputs up to float summation order (the block path runs each block on cached
    # inputs instead of inside the full model): the Hessians agree to ~1e-6, which leaves every
    # k-means / GPTQ decision, hence codes and weights, identical or within rounding of them.
    for name in wg:
        assert torch.allclose(wg[name], wb[name], rtol=0, atol=1e-4 * float(wg[name].abs().max())), name
    errs_g = [r.relative_error for r in rep_g.compressed]
    errs_b = [r.relative_error for r in rep_b.compressed]
    assert errs_b == pytest.approx(errs_g, rel=1e-3)
    assert {r.error_kind for r in rep_b.compressed} == {"output" if original_target else "layer"}


def test_each_block_runs_a_depth_independent_number_of_times():
    batches = token_batches()
    cfg = VQConfig(**CFG)
    calls = {}
    for blocks in (None, "auto"):
        model = tiny_llama()
        counts = count_block_calls(model)
        compress(model, cfg, calibration=batches, blocks=blocks)
        calls[blocks] = counts
    # Block path: 2 tracing forwards of batch 0 (execution order, chain check), then per batch one
    # pass of the original block that records its layers' inputs and outputs (the original stream),
    # one compressed pass per layer group (q/k/v, o, gate/up, down) and one to make the next block's
    # inputs (not after the last block). Capturing block 0's inputs reaches its pre-hook once per batch.
    n, groups = len(batches), 4
    per_block = [2 + n + n + n * groups + n, 2 + n + n * groups + n, 2 + n + n * groups]
    assert calls["auto"] == per_block
    # The whole-model path runs block 0 again for every later group: its count grows with depth.
    assert calls[None][0] > calls[None][1] > calls[None][2]
    assert calls[None][0] > 2 * calls["auto"][0]


def test_over_the_record_budget_the_original_block_reruns_per_group(monkeypatch):
    # Recording the original block's layer inputs once per block is an optimisation: past the
    # memory budget the original block re-runs for every layer group, with the same result.
    from vqlib.compress import blockwise

    batches = token_batches()
    cfg = VQConfig(**CFG)
    recorded, _ = compress(tiny_llama(), cfg, calibration=batches)
    monkeypatch.setattr(blockwise, "RECORD_BUDGET_BYTES", 0)
    model = tiny_llama()
    counts = count_block_calls(model)
    rerun, _ = compress(model, cfg, calibration=batches)
    wr, wn = dequantized(recorded), dequantized(rerun)
    for name in wr:
        assert torch.equal(wr[name], wn[name]), name
    n = len(batches)
    # block 1: the abandoned recording pass (batch 0), 3 original passes for groups 2-4 (the first
    # group's original pass stops at once), 4 compressed ones and the original output pass
    assert counts[1] > 2 + n + n * 4 + n


class Residual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        return x + self.mlp(x)


class Chain(nn.Module):
    """Blocks in a ModuleList, plus a linear before and after them."""

    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Residual(dim) for _ in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Skipping(Chain):
    def forward(self, x):  # block 1 reads the embedding, not block 0's output: not a chain
        h = self.embed(x)
        x = self.blocks[0](h)
        x = self.blocks[1](h) + x
        return self.head(self.blocks[2](x))


def chain_batches():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(64, 32, generator=gen) for _ in range(3)]


def test_layers_before_and_after_the_blocks_and_same_result():
    torch.manual_seed(0)
    model = Chain()
    cfg = VQConfig(**CFG, skip_modules=[])
    assert find_blocks(model, [n for n, _ in model.named_modules()], "auto")[0] == "blocks"
    a, rep_a = compress(copy.deepcopy(model), cfg, calibration=chain_batches(), blocks=None)
    b, rep_b = compress(copy.deepcopy(model), cfg, calibration=chain_batches(), blocks="blocks")
    wa, wb = dequantized(a), dequantized(b)
    for name in wa:
        if name != "head":  # after the blocks the block path fits the layer output on compressed inputs
            assert torch.allclose(wa[name], wb[name], atol=1e-5), name
    kinds = {r.name: r.error_kind for r in rep_b.compressed}
    assert kinds["embed"] == kinds["blocks.2.mlp.2"] == "output" and kinds["head"] == "layer"


def test_blocks_that_are_not_a_chain_fall_back_with_a_warning():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="falling back to whole-model passes"):
        _, report = compress(Skipping(), VQConfig(**CFG), calibration=chain_batches())
    assert len(report.compressed) == 8


def test_bad_blocks_argument():
    with pytest.raises(ValueError, match="names no submodule"):
        compress(Chain(), VQConfig(**CFG), calibration=chain_batches(), blocks="nope")
    with pytest.raises(ValueError, match="expected an nn.ModuleList"):
        compress(Chain(), VQConfig(**CFG), calibration=chain_batches(), blocks="head")


def test_block_finetune_lowers_the_block_output_error():
    batches = token_batches(4)
    original = tiny_llama()
    with torch.no_grad():
        ref = [original.model(**b).last_hidden_state for b in batches]

    def final_error(steps):
        model, _ = compress(tiny_llama(), VQConfig(**CFG, block_finetune_steps=steps), calibration=batches)
        with torch.no_grad():
            out = [model.model(**b).last_hidden_state for b in batches]
        return sum(float((o - r).pow(2).sum() / r.pow(2).sum()) for o, r in zip(out, ref))

    assert final_error(24) < 0.99 * final_error(0)


def test_narrow_layers_take_w_c_from_the_recorded_outputs(monkeypatch):
    """down_proj (128 -> 64) gets W C = Y_ref^T X / n from the original block's recorded outputs, never
    the (in, in) C; the wider groups keep C. (Equality with the generic path, which always uses C, is
    test_blockwise_matches_whole_model_passes.)"""
    from vqlib.compress import algorithms

    seen = {}
    real = algorithms.gptq_vq

    def spy(weight, hessian, cfg, seed, cross=None, weighted_cross=None):
        seen.setdefault(tuple(weight.shape), []).append((cross is not None, weighted_cross is not None))
        return real(weight, hessian, cfg, seed, cross=cross, weighted_cross=weighted_cross)

    monkeypatch.setattr(algorithms, "gptq_vq", spy)
    compress(tiny_llama(), VQConfig(**CFG), calibration=token_batches())
    assert seen[(64, 128)] == [(False, True)] * 3  # down_proj of each block
    assert set(seen[(128, 64)]) == {(True, False)}  # gate/up: C
