"""End-to-end fine-tuning of a compressed model against the original's next-token distribution."""

import copy

import pytest
import torch

from vqlib.compress import VQConfig, VQLinear, compress
from vqlib.compress.end_to_end import EndToEndConfig, finetune_end_to_end, logits_of, step_size, token_kl

transformers = pytest.importorskip("transformers")

from test_compress_blockwise import tiny_llama, token_batches  # noqa: E402

# A deliberately coarse format (16 codes of 4 weights): a large error leaves the fine-tune room to act.
CFG = VQConfig(vector_dim=4, codebook_bits=4, group_size=None, kmeans_iters=6, finetune_steps=2)


@pytest.fixture(scope="module")
def compressed_pair():
    teacher = tiny_llama()
    model, _ = compress(copy.deepcopy(teacher), CFG, calibration=token_batches())
    return teacher, model


def stored(model):
    return {
        n: {k: v.clone() for k, v in m.state_dict().items()}
        for n, m in model.named_modules()
        if isinstance(m, VQLinear)
    }


def test_finetune_lowers_kl_and_keeps_codes_and_storage_dtypes(compressed_pair):
    teacher, model = compressed_pair
    model = copy.deepcopy(model)
    before = stored(model)
    norm_before = model.model.norm.weight.detach().clone()
    report = finetune_end_to_end(model, teacher, token_batches(), EndToEndConfig(steps=12, lr=3e-3))
    assert report.kept and report.kl_after < 0.9 * report.kl_before, report
    after = stored(model)
    for name, state in before.items():
        assert torch.equal(state["codes"], after[name]["codes"]), name  # codes are fixed
        for key, value in state.items():
            assert after[name][key].dtype == value.dtype, (name, key)
    assert any(not torch.equal(before[n]["codebooks"], after[n]["codebooks"]) for n in before)
    assert not torch.equal(model.model.norm.weight, norm_before)  # norms train by default
    assert not any(p.grad is not None for p in model.parameters())  # nothing left half-trained
    assert all(p.requires_grad for p in model.parameters())  # the frozen flags were put back
    # The report's number is the model as it now is: measure it again from scratch.
    batches = token_batches()
    with torch.no_grad():
        kl = sum(
            float(token_kl(logits_of(model(**b)), logits_of(teacher(**b)), b["attention_mask"].bool())) for b in batches
        )
    assert kl / len(batches) == pytest.approx(report.kl_after, rel=1e-4)


def test_a_worse_result_is_discarded(compressed_pair):
    teacher, model = compressed_pair
    model = copy.deepcopy(model)
    before = stored(model)
    norm_before = model.model.norm.weight.detach().clone()
    # A huge step size wrecks the codebooks: the rounded model is worse, so nothing may change.
    report = finetune_end_to_end(model, teacher, token_batches(), EndToEndConfig(steps=3, lr=0.9))
    assert not report.kept and report.kl_after == report.kl_before
    after = stored(model)
    for name, state in before.items():
        for key, value in state.items():
            assert torch.equal(after[name][key], value), (name, key)
    assert torch.equal(model.model.norm.weight, norm_before)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="steps"):
        EndToEndConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        EndToEndConfig(lr=2.0)
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine', got 'linear'"):
        EndToEndConfig(schedule="linear")
    teacher = tiny_llama()
    with pytest.raises(ValueError, match="no VQLinear"):
        finetune_end_to_end(copy.deepcopy(teacher), teacher, token_batches())
    with pytest.raises(TypeError, match="logits"):
        logits_of({"hidden": torch.zeros(1)})


def test_cosine_schedule_decays_from_lr_towards_zero():
    cfg = EndToEndConfig(steps=8, lr=1e-3, schedule="cosine")
    sizes = [step_size(cfg, t) for t in range(cfg.steps)]
    assert sizes[0] == pytest.approx(1e-3)
    assert sizes[4] == pytest.approx(0.5e-3)
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert 0 < sizes[-1] < 0.05e-3
    constant = EndToEndConfig(steps=8, lr=1e-3, schedule="constant")
    assert {step_size(constant, t) for t in range(8)} == {1e-3}
